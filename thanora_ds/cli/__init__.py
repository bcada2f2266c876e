"""Console commands: ``thanora-train``, ``thanora-merge``, ``thanora-eval`` (also ``launchers/*.py``)."""
import warnings

# Library warnings that say nothing to a user of this tool and, through DeepSpeed's ZeRO-3 collectives, repeat at
# every step (hundreds of lines per run): silenced once, at start, by exact message.
KNOWN_NOISE = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",  # called by DeepSpeed
    r"`gradient_checkpointing_enable` is deprecated",                                      # called by transformers
)


def quiet_library_warnings() -> None:
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
