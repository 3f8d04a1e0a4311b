"""Architecture registry: ``--arch NAME`` and model files name an architecture class here."""

from __future__ import annotations

import importlib

from ..errors import InputError
from .base import Architecture

#: name -> "module:Class"; modules are imported on first use so importing the library stays cheap.
_ARCHITECTURES = {
    "triplanar": "MultiTaskSegLib.architectures.triplanar:TriplanarArchitecture",
    "unet3d_factorised": "MultiTaskSegLib.architectures.unet3d:FactorisedUNet3DArchitecture",
    "cmunet": "MultiTaskSegLib.architectures.unet2d:CMUNetArchitecture",
    "unet2d": "MultiTaskSegLib.architectures.unet2d:UNet2DArchitecture",
    "unet2d_pretrained": "MultiTaskSegLib.architectures.unet2d:PretrainedEncoderUNet2DArchitecture",
    "unet2d_multiplanar": "MultiTaskSegLib.architectures.multiplanar:MultiplanarUNet2DArchitecture",
    "ensemble": "MultiTaskSegLib.architectures.ensemble:EnsembleArchitecture",
}


def architecture_names() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def architecture_class(name: str) -> type[Architecture]:
    try:
        module_name, class_name = _ARCHITECTURES[name].split(":")
    except KeyError:
        raise InputError(f"unknown architecture {name!r}; choose one of {', '.join(_ARCHITECTURES)}") from None
    return getattr(importlib.import_module(module_name), class_name)
