"""`prepare` against the bare tokenizer: seconds and the ratio, measured side by side in one run.

The baseline is the same tokenizer's `encode_batch_fast` on the same documents, already in memory,
in batches of the same size, with the same number of processes (1: in this process, the
tokenizer's own threads; N: a pool of N forked processes, one thread each). `prepare` also reads
the JSONL file, hashes every document (duplicates, split), converts the ids and writes the shards.
The goal is prepare <= 1.5x the baseline.

    python benchmarks/bench_prepare.py [--mb 20] [--workers 1 2] [--repeats 2]
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot_transition.data.prepare import prepare  # noqa: E402
from mot_transition.data.sources import decode_file, stdlib_files  # noqa: E402
from mot_transition.data.tokenizer import train_bpe_tokenizer  # noqa: E402

BATCH_BYTES = 1_000_000  # prepare's default batch
_tokenizer = None


def corpus(path: Path, megabytes: float) -> list[str]:
    """The stdlib's .py files, repeated with a numbered first line (no exact copies) up to `megabytes`."""
    files = [text for _, file in stdlib_files() if (text := decode_file(file))]
    documents, size, copy = [], 0, 0
    while size < megabytes * 1e6:
        for text in files:
            document = f"# copy {copy}\n{text}"
            documents.append(document)
            size += len(document.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
        copy += 1
    with path.open("w") as f:
        for document in documents:
            f.write(json.dumps({"text": document}) + "\n")
    return documents


def batches(documents: list[str]) -> list[list[str]]:
    out, current, size = [], [], 0
    for document in documents:
        current.append(document)
        size += len(document.encode("utf-8"))
        if size >= BATCH_BYTES:
            out.append(current)
            current, size = [], 0
    return out + ([current] if current else [])


def _init(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = Tokenizer.from_str(tokenizer_json)


def _count(texts: list[str]) -> int:
    return sum(len(e.ids) for e in _tokenizer.encode_batch_fast(texts, add_special_tokens=False))


def baseline(tokenizer_json: str, work: list[list[str]], workers: int) -> float:
    start = time.perf_counter()
    if workers == 1:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        for texts in work:
            tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    else:
        with multiprocessing.get_context("fork").Pool(workers, _init, (tokenizer_json,)) as pool:
            sum(pool.imap(_count, work))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # workers=1 baseline: the tokenizer's own threads
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        documents = corpus(tmp / "corpus.jsonl", args.mb)
        megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
        tokenizer = train_bpe_tokenizer(documents[:200], args.vocab_size)
        tokenizer.save_pretrained(tmp / "tokenizer")
        tokenizer_json, work = tokenizer.backend_tokenizer.to_str(), batches(documents)
        print(f"{megabytes:.1f} MB of text, {len(documents)} documents, vocabulary {len(tokenizer)}, "
              f"{os.cpu_count()} cores, best of {args.repeats}")
        print("| workers | encode_batch s | prepare s | prepare MB/s | ratio |\n| --- | --- | --- | --- | --- |")
        for workers in args.workers:
            base, full = [], []
            for _ in range(args.repeats):
                base.append(baseline(tokenizer_json, work, workers))
                start = time.perf_counter()
                prepare([str(tmp / "corpus.jsonl")], tmp / "out", tokenizer=tmp / "tokenizer", workers=workers, force=True)
                full.append(time.perf_counter() - start)
            b, p = min(base), min(full)
            print(f"| {workers} | {b:.2f} | {p:.2f} | {megabytes / p:.1f} | {p / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
