"""Names shared by the ONNX export and the runtimes that call its graphs (kept import-free: the runtime
imports it at engine load)."""

# An exported graph's output `<name>.next` is the new value of its state input `<name>`; the runtimes
# copy it back into the tensor passed in, as the AOTI graphs update their state inputs in place.
STATE_SUFFIX = ".next"
