"""An importance matrix measurably helps on a real trained model (SmolLM2-135M): Q2_K and IQ2_XS
made with our imatrix are closer to the bf16 model (mean KL divergence of next-token
distributions, transformers as the reference) than the same types made without one.

IQ2_XS cannot be made without importance weights at all (llama.cpp refuses), so its "without"
is an imatrix of ones: every column equally important, i.e. no information."""

from __future__ import annotations

import numpy as np
import pytest

from quantyard.engine.gguf.converter import write_float_gguf
from quantyard.engine.gguf.imatrix import ImatrixData, compute_imatrix, load_imatrix
from quantyard.engine.gguf.quality import logit_metrics
from quantyard.engine.gguf.quantize import quantize_gguf
from quantyard.engine.gguf.validate import hf_reference, llama_reference
from quantyard.engine.hf.source import open_source

# Held out: not part of the shipped calibration text the imatrix is computed from.
EVALUATION_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small "
    "lamp and a notebook in which he recorded the weather, the ships he saw and the birds that "
    "rested on the railing. Over thirty years the notebooks filled a whole shelf.\n"
    "def moving_average(values, window):\n"
    "    total = sum(values[:window])\n"
    "    out = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n"
    "    return out\n"
    "In spring the farmers planted barley and beans; by late summer the fields turned gold."
)


@pytest.fixture(scope="module")
def smollm2_setup(smollm2_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2-imatrix")
    source = open_source(smollm2_dir)
    intermediate = work / "smollm2-BF16.gguf"
    write_float_gguf(source, intermediate, "BF16")
    from quantyard.engine.gguf.gguf_input import GGUFInput

    with GGUFInput(intermediate) as g:
        shapes = {name: t.ne for name, t in g.tensors.items()}
    data = compute_imatrix(smollm2_dir, gguf_arch="llama", n_blocks=source.config["num_hidden_layers"],
                           gguf_tensors=shapes)
    imatrix = data.save(work / "imatrix.gguf")
    ids, reference = hf_reference(smollm2_dir, EVALUATION_TEXT)
    return work, intermediate, load_imatrix(imatrix), ids, reference


def _uniform(imatrix: ImatrixData) -> ImatrixData:
    return ImatrixData(sums={n: np.ones_like(v) for n, v in imatrix.sums.items()},
                       counts={n: np.ones_like(c) for n, c in imatrix.counts.items()},
                       datasets=["uniform"], chunk_count=1, chunk_size=imatrix.chunk_size)


def _kl(setup, quantization: str, imatrix) -> float:
    work, intermediate, _, ids, reference = setup
    out = work / f"{quantization}-{'none' if imatrix is None else imatrix.datasets[0]}.gguf"
    quantize_gguf(intermediate, out, quantization, imatrix=imatrix)
    llama_ids, logits = llama_reference(out, EVALUATION_TEXT, 512)
    assert llama_ids == ids
    return logit_metrics(reference, logits)["mean_kl"]


@pytest.mark.parametrize("quantization", ["Q2_K", "IQ2_XS"])
def test_imatrix_lowers_kl_divergence(smollm2_setup, quantization):
    imatrix = smollm2_setup[2]
    without = _uniform(imatrix) if quantization == "IQ2_XS" else None
    kl_with = _kl(smollm2_setup, quantization, imatrix)
    kl_without = _kl(smollm2_setup, quantization, without)
    print(f"{quantization}: mean KL with imatrix {kl_with:.4f}, without {kl_without:.4f}")
    assert kl_with < kl_without
