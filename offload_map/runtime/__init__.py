"""Stage 4, runtime: carrying out a plan, and undoing it.

Files: ``runtime`` (the ``Runtime``: build, public surface, undo), ``host_store``/``host_buffer`` (packed host
copies), ``shared_host`` (one host copy for the ranks of a host), ``unit`` (one owner per offloaded unit),
``slots``, ``ring`` and ``prefetcher`` (streaming a DiT's blocks), ``sharded_copy`` (how a block reaches its
slot), ``swapper`` (components taking turns), ``resident`` (``"gpu"`` tensors), ``hooks``/``guard``
(accelerate hooks), ``streams``, ``calibration``, ``bandwidth``, ``report``; with ``compression``, ``codec`` and
``codec_kernel`` (the lossless code), ``coded_host`` and ``fp8_host`` (a unit's code in host memory),
``fp8_kernel``.

Stream-ordering rules (each tested on a GPU with delays injected on the streams, ``tests/test_stream_order.py``):

1. Only the copy stream reads host buffers (every host-to-device weight copy is issued there).
2. A copy into a slot waits for the slot's ``free`` event: recorded by the last block that read it (on the
   stream it ran on), and once at allocation (the memory may have served earlier work on that stream).
3. A block reads its slot only after the compute stream waited on the slot's ``ready`` event, recorded after
   the copy; its module's tensors point into the slot only from that wait to the end of its forward.
4. A head (kept block part, pinned component) is copied on the copy stream after its allocation stream's
   earlier work, and waited for by the compute stream before use; when dropped, its allocation stream waits
   for the current stream before the buffer is given back.
5. Slots are given back only after their allocation stream waited for each slot's last copy and last reader.
6. Host buffers are rewritten (``refresh``) only after the host waited for the copy stream, and the slots'
   earlier copies are forgotten; ``restore`` waits for the whole device (any stream may still read a weight)
   before anything is freed or unregistered.
7. Coded blocks (``compression``): a piece is decoded out of a staging buffer only after the decode stream
   waited for its copy (``copied``), and copied into a staging buffer only after the copy stream waited for the
   decode that last read it (``decoded``); a coded load's ``ready`` is recorded on the decode stream after its
   last decode, and a coded load that is cancelled makes the copy stream wait for that ``ready`` (its decodes
   may still be writing the slot the next copy goes into).
"""
