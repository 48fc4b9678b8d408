"""The engine: between the tensor math (``deltastore.tensor``) and storage (``deltastore.storage``).

- :mod:`.decode`: the one decoder (a stored tensor entry to a tensor, fused or reference path);
- :mod:`.reader`: reading stored arrays and finetune tensors onto a device, ahead, in threads;
- :mod:`.materialize`: the streaming materialize pipeline (every device);
- :mod:`.resident`: :class:`ResidentModel`, in-place task switching on a device.
"""
