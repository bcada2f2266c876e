"""Model-family specifics (what one family needs that the generic code paths do not)."""
