"""Exceptions of qwen35-export. Each message names the file, tensor or field, what was expected and what
was found, so the CLI can print it as is (no traceback)."""


class Qwen35Error(Exception):
    """Base class: the CLI prints these as one clean message and exits non-zero."""


class ConfigError(Qwen35Error):
    """A config.json field is missing, of the wrong type, or describes an unsupported model."""


class CheckpointError(Qwen35Error):
    """A checkpoint file, shard or tensor is missing, corrupt, or of the wrong shape/dtype."""


class BuildError(Qwen35Error):
    """An engine build cannot proceed (target, device or settings)."""


class EngineError(Qwen35Error):
    """An engine directory cannot be loaded (manifest, hashes, target mismatch) or was misused."""


class InputError(Qwen35Error):
    """Bad input at run time: empty prompt, token id out of range, prompt too long, batch too large."""
