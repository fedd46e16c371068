"""Instruments every unpickler torch can reach while it loads a program.

Recorded as safe: torch.load(weights_only=True) and the restricted unpickler it uses
(torch._weights_only_unpickler.Unpickler.load). Recorded as unsafe: torch.load with
weights_only anything but True, pickle.Unpickler (torch.load's weights_only=False path
subclasses it at call time), pickle.loads / pickle.load (opaque objects), and
torch._C._pickle_load_obj (TorchBind objects). Calls are recorded before the real function
runs. Installed around plain torch.export.load, it shows what torch itself would unpickle;
around Quantyard's loader, whose own guard (program.weights_only_unpickling) sits inside and
refuses unsafe calls before they reach these functions, it shows what actually ran.
"""

from __future__ import annotations

import pickle
import traceback


class Recorder:
    def __init__(self) -> None:
        self.safe: list[str] = []
        self.unsafe: list[str] = []

    def _where(self) -> str:
        frames = [f for f in traceback.extract_stack()[:-2] if "program_unpicklers" not in f.filename]
        return " <- ".join(f"{f.name}" for f in frames[-4:])

    def __enter__(self) -> Recorder:
        import torch
        import torch._weights_only_unpickler as wou

        rec = self
        self._saved = (torch.load, pickle.loads, pickle.load, pickle.Unpickler, torch._C._pickle_load_obj,
                       wou.Unpickler.load)
        real_load, real_loads, real_pload, real_unpickler, real_obj, real_safe = self._saved

        def load(*args, **kwargs):
            (rec.safe if kwargs.get("weights_only") is True else rec.unsafe).append(
                f"torch.load(weights_only={kwargs.get('weights_only')!r}) at {rec._where()}")
            return real_load(*args, **kwargs)

        def loads(*args, **kwargs):
            rec.unsafe.append(f"pickle.loads at {rec._where()}")
            return real_loads(*args, **kwargs)

        def pload(*args, **kwargs):
            rec.unsafe.append(f"pickle.load at {rec._where()}")
            return real_pload(*args, **kwargs)

        class Unpickler(real_unpickler):
            def load(self):
                rec.unsafe.append(f"pickle.Unpickler.load at {rec._where()}")
                return super().load()

        def pickle_load_obj(*args, **kwargs):
            rec.unsafe.append(f"torch._C._pickle_load_obj at {rec._where()}")
            return real_obj(*args, **kwargs)

        def safe_load(unpickler_self):
            rec.safe.append("torch._weights_only_unpickler.Unpickler.load")
            return real_safe(unpickler_self)

        torch.load, pickle.loads, pickle.load, pickle.Unpickler = load, loads, pload, Unpickler
        torch._C._pickle_load_obj, wou.Unpickler.load = pickle_load_obj, safe_load
        return self

    def __exit__(self, *exc) -> None:
        import torch
        import torch._weights_only_unpickler as wou

        (torch.load, pickle.loads, pickle.load, pickle.Unpickler, torch._C._pickle_load_obj,
         wou.Unpickler.load) = self._saved

    def report(self) -> dict:
        return {"safe": list(self.safe), "unsafe": list(self.unsafe)}
