"""Bring your own model and data: BackdoorBench checkpoints, plain state dicts, safetensors,
user architectures and clean data from folders or array files.

Nothing a user hands us may run code. PyTorch files are read with ``torch.load(weights_only=True)``
after their pickle opcodes are checked against a short allow-list (tensors, plain containers,
numeric numpy arrays); anything else is refused with one line naming what was found. A user's
own architecture is imported only when the user names it (``--arch package.module:factory``).

Entry points: :func:`load_model_file` (any model file or folder), :func:`load_images` (clean or
test data from a dataset name, an image folder or an array file), :func:`purify` (any
``nn.Module``), :func:`describe_path` (``tsbd inspect``).
"""

from tsbd.interop.architectures import check_prunable, classify_layers, import_factory
from tsbd.interop.checkpoints import ImportedModel, load_model_file, read_torch_file, save_backdoorbench
from tsbd.interop.images import LoadedImages, load_images
from tsbd.interop.inspect import describe_path
from tsbd.interop.purify import purify

__all__ = [
    "ImportedModel",
    "LoadedImages",
    "check_prunable",
    "classify_layers",
    "describe_path",
    "import_factory",
    "load_images",
    "load_model_file",
    "purify",
    "read_torch_file",
    "save_backdoorbench",
]
