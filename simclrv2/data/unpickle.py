"""Reading the CIFAR python batches without letting them run code.

A pickle names the functions the reader calls to rebuild it, so ``pickle.load`` on a crafted
``data_batch_1`` runs whatever it names. The CIFAR files (written by Python 2's cPickle,
protocol 2) hold only dicts, lists, strings and ints plus one numpy uint8 array, which numpy
pickles as ``numpy.core.multiarray._reconstruct(numpy.ndarray, ...)`` with a ``numpy.dtype``;
the same data written again by Python 3 adds ``_codecs.encode(text, "latin1")`` for bytes at
protocol 2, or ``numpy._core.numeric._frombuffer`` at protocol 5. Those are the only names
:class:`CifarUnpickler` resolves (each only builds arrays or bytes); anything else is refused
before it is called.
"""
from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np

_reconstruct = np.zeros(0).__reduce_ex__(2)[0]  # numpy's array rebuilders, wherever numpy keeps them
_frombuffer = np.zeros(0).__reduce_ex__(5)[0]


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocol 2, and nothing else."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it asks for _codecs.encode with encoding {encoding!r}, which CIFAR batches "
                                     "never use")
    return text.encode("latin1")


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # protocol 5 (Python 3.14's default)
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR batches hold (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds, so it could "
                                         "run code") from None


def load_cifar_pickle(file: IO[bytes]) -> Any:
    """Unpickle a CIFAR batch (Python 2 strings as ``bytes``); raises ``pickle.UnpicklingError``
    for any name outside :data:`ALLOWED`."""
    return CifarUnpickler(file, encoding="bytes").load()
