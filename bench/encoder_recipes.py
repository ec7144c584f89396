"""Quantization recipes for the default MiniLM, side by side: CPU per embedding and cosine to fp32.

    python bench/encoder_recipes.py [--rounds 6] [--datasets ../shared/datasets]

Builds, in a temporary folder, today's copy (agentflow.embeddings.quantized.quantize) and a copy of
the same graph whose attention blocks are first rewritten into onnxruntime's fused operators (each
layer's ~35 reshape / transpose / scale / mask / softmax / NaN-guard nodes become one
``com.microsoft.MultiHeadAttention`` over the Q, K and V projections, and the erf GELU becomes one
``Gelu``) before the same ``quantize_dynamic``; the fp32 rewrite equals the package graph within
1.2e-7. Then, alternated text by text, one text per run and one inference thread as a turn does, it
times 200 BANKING77 test messages and 200 24-word reply tails (``reply_tail`` of the support chats'
assistant turns) and prints each variant's CPU per embedding as the sum over texts of each text's
fastest run (robust to other work on the machine), plus mean / 1st percentile / lowest cosine to
the fp32 graph over all bench texts. Variants also run with the session options
``session.x64quantprecision`` (AVX2's exact u8s8 kernel) and ``optimization.enable_gelu_approximation``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fuse_attention(model):
    """Rewrite each attention block into MultiHeadAttention and each erf GELU into Gelu (in place)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    producer = {o: n for n in graph.node for o in n.output}
    users = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)

    def projection(name):
        """Walk up Reshape / Transpose / Mul(constant) to ``MatMul(x, W) + b``: (output, scale, MatMul)."""
        scale = 1.0
        while (node := producer.get(name)) is not None:
            if node.op_type in ("Reshape", "Transpose"):
                name = node.input[0]
            elif node.op_type == "Mul" and any(i in inits for i in node.input):
                constant = next(i for i in node.input if i in inits)
                scale *= float(const(constant))
                name = next(i for i in node.input if i != constant)
            elif node.op_type == "Add":
                for i, side in enumerate(node.input):
                    mm = producer.get(side)
                    if mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits:
                        if node.input[1 - i] in inits:
                            return name, scale, mm
                return None
            else:
                return None
        return None

    fused, replaced = [], set()
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        masked = producer[softmax.input[0]]  # Add(Q K^T, mask bias)
        scores = next(
            (producer[i] for i in masked.input if getattr(producer.get(i), "op_type", "") == "MatMul"), None
        )
        guard = next((u for u in users[softmax.output[0]] if u.op_type == "Where"), None)
        probs = guard.output[0] if guard is not None else softmax.output[0]
        context = next((u for u in users[probs] if u.op_type == "MatMul"), None)
        if scores is None or context is None:
            continue
        q, k, v = projection(scores.input[0]), projection(scores.input[1]), projection(context.input[1])
        transpose = users[context.output[0]][0]
        reshape = users[transpose.output[0]][0] if transpose.op_type == "Transpose" else None
        if None in (q, k, v) or reshape is None or reshape.op_type != "Reshape":
            continue
        hidden = const(q[2].input[1]).shape[1]
        head = round(1 / (q[1] * k[1]) ** 2)  # the graph scales Q and K by head_size ** -0.25 each
        if hidden % head or abs(q[1] * k[1] * np.sqrt(head) - 1) > 1e-5:
            continue
        fused.append(
            helper.make_node(
                "MultiHeadAttention",
                [q[0], k[0], v[0], "", "attention_mask_int32"],
                [reshape.output[0]],
                name=f"attention_{len(fused)}",
                domain="com.microsoft",
                num_heads=hidden // head,
            )
        )
        replaced.add(reshape.output[0])
    nodes = [helper.make_node("Cast", ["attention_mask"], ["attention_mask_int32"], to=TensorProto.INT32)]
    nodes += [n for n in graph.node if not set(n.output) & replaced] + fused
    nodes = [gelu(n, producer, users, const) or n for n in nodes]
    ready, ordered, pending = {i.name for i in graph.input} | set(inits) | {""}, [], nodes
    while pending:  # topological order
        waiting = [n for n in pending if not all(i in ready for i in n.input)]
        for node in pending:
            if node not in waiting:
                ordered.append(node)
                ready.update(node.output)
        if len(waiting) == len(pending):
            raise ValueError("the rewritten graph has a cycle")
        pending = waiting
    needed, kept = {o.name for o in graph.output}, []
    for node in reversed(ordered):  # drop what no output needs
        if set(node.output) & needed:
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {i for n in graph.node for i in n.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def gelu(node, producer, users, const):
    """``x * (0.5 * (1 + erf(x / sqrt 2)))`` ending at ``node`` as one Gelu node, else None."""
    import numpy as np
    from onnx import helper

    def value(name):
        found = const(name)
        return None if found is None else float(found)

    if node.op_type != "Mul":
        return None
    for x, other in (node.input, node.input[::-1]):
        half = producer.get(other)
        if half is None or half.op_type != "Mul" or 0.5 not in [value(i) for i in half.input]:
            continue
        add = next((producer[i] for i in half.input if i in producer), None)
        if add is None or add.op_type != "Add" or 1.0 not in [value(i) for i in add.input]:
            continue
        erf = next((producer[i] for i in add.input if i in producer), None)
        div = producer.get(erf.input[0]) if erf is not None and erf.op_type == "Erf" else None
        if div is not None and div.op_type == "Div" and div.input[0] == x:
            if abs((value(div.input[1]) or 0) - np.sqrt(2)) < 1e-6:
                return helper.make_node("Gelu", [x], list(node.output), domain="com.microsoft")
    return None


def bench_texts(datasets: Path) -> tuple[list[str], list[str], list[str]]:
    from conversations.thread_detection import reply_tail

    rows = list(csv.DictReader((datasets / "banking77" / "test.csv").open()))
    banking = [r["text"] for r in random.Random(1).sample(rows, 600)]
    users, tails = [], []
    for name in ("support_turns.jsonl", "support_styles.jsonl"):
        for line in (ROOT / "bench" / "data" / name).read_text().splitlines():
            replies: list[str] = []
            for turn in json.loads(line)["turns"]:
                if turn["speaker"] == "USER":
                    users.append(turn["utterance"])
                else:  # a long reply: this system turn and the two before it
                    replies.append(turn["utterance"])
                    tails.append(reply_tail(" ".join(replies[-3:]), 24))
    tails = [t for t in dict.fromkeys(tails) if len(t.split()) >= 16]
    return banking, list(dict.fromkeys(users)), tails


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from agentflow.embeddings import MiniLMFp32Embedder

    fp32 = MiniLMFp32Embedder()
    work = Path(tempfile.mkdtemp(prefix="encoder-recipes-"))
    try:
        run(args, work, fp32)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, fp32) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from agentflow.embeddings import MiniLMFp32Embedder
    from agentflow.embeddings.quantized import quantize

    source = fp32.model_path()
    quantize(source, work / "today.onnx")
    folded = work / "folded.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    model = onnx.load(folded)
    print(f"attention blocks fused: {fuse_attention(model)}")
    onnx.save(model, work / "fused_fp32.onnx")
    quantize_dynamic(
        work / "fused_fp32.onnx", work / "fused.onnx", weight_type=QuantType.QInt8, per_channel=True
    )

    def embedder(graph: str, **entries: str) -> MiniLMFp32Embedder:
        e = MiniLMFp32Embedder()
        o = ort.SessionOptions()
        o.intra_op_num_threads = o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in entries.items():
            o.add_session_config_entry(key.replace("__", "."), value)
        e._session = ort.InferenceSession(graph, sess_options=o, providers=["CPUExecutionProvider"])
        return e

    today, fused = str(work / "today.onnx"), str(work / "fused.onnx")
    variants = {
        "fp32 (minilm-fp32)": fp32,
        "today's int8 copy": embedder(today),
        "attention fused, int8": embedder(fused),
        "attention fused + gelu approx": embedder(fused, optimization__enable_gelu_approximation="1"),
        "today + x64quantprecision": embedder(today, session__x64quantprecision="1"),
    }
    banking, users, tails = bench_texts(args.datasets)
    every = list(dict.fromkeys(banking + users + tails))
    reference = np.concatenate([fp32.embed([t]) for t in every])
    print(
        f"cosine to fp32 over {len(every)} texts ({len(banking)} BANKING77, {len(users)} user turns, "
        f"{len(tails)} reply tails): mean / 1st percentile / lowest"
    )
    for name, e in variants.items():
        c = np.sum(np.concatenate([e.embed([t]) for t in every]) * reference, axis=1)
        print(
            f"  {name:32s} {c.mean():.4f} / {np.percentile(c, 1):.4f} / {c.min():.4f} ({every[int(c.argmin())]!r})"
        )
    sets = {"BANKING77 messages": banking[:200], "24-word reply tails": tails[:200]}
    best = {(n, s): [1e9] * len(texts) for n in variants for s, texts in sets.items()}
    for _ in range(args.rounds):
        for s, texts in sets.items():
            for i, text in enumerate(texts):
                for n, e in variants.items():
                    start = time.thread_time()
                    e.embed([text])
                    best[(n, s)][i] = min(best[(n, s)][i], time.thread_time() - start)
    load = os.getloadavg()
    print(f"CPU per embedding, sum of each text's fastest of {args.rounds} runs (load {load[0]:.1f})")
    for s, texts in sets.items():
        base = sum(best[("today's int8 copy", s)])
        for n in variants:
            total = sum(best[(n, s)])
            print(f"  {s:20s} {n:32s} {total / len(texts) * 1000:6.2f} ms ({total / base - 1:+.1%})")


if __name__ == "__main__":
    main()
