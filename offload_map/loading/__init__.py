"""Reading weights from disk: safetensors checkpoints (``checkpoint``) and which checkpoint fills which tensor of
a component built on the meta device (``weights``). Read straight into host buffers or device tensors by the
runtime; nothing here keeps a copy of the weights.
"""
