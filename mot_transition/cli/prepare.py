"""`mot-transition prepare SOURCE... --out DIR`: a corpus into sharded token files (docs/design.md §11)."""

from pathlib import Path

import typer
from rich.console import Console

from .app import app


@app.command(epilog="Example: mot-transition prepare stdlib --out data/stdlib --max-bytes 4000000")
def prepare(
    sources: list[str] = typer.Argument(..., help="Text files, folders, .jsonl(.gz) or .parquet files, globs, datasets saved with save_to_disk, hf:NAME (a Hub dataset, streamed), or 'stdlib'."),
    out: Path = typer.Option(..., "--out", help="Folder to write the prepared corpus to (new or empty)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="A tokenizer folder that AutoTokenizer loads; default: train a byte-level BPE."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Vocabulary of the trained BPE (without --tokenizer)."),
    sample_bytes: int = typer.Option(100_000_000, "--sample-bytes", help="Train the BPE on the train split's first this many bytes."),
    text_field: str = typer.Option("text", "--text-field", help="The field or column that holds the text of a record."),
    heldout_fraction: float = typer.Option(0.05, "--heldout-fraction", help="Share of documents held out, by a stable hash of each document's key."),
    max_bytes: int = typer.Option(None, "--max-bytes", help="Read only the leading documents up to this many bytes (the one that crosses it is cut)."),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Close a shard after the document that brings it to this many tokens."),
    workers: int = typer.Option(1, "--workers", help="Tokenizer processes; 1 tokenises here with the tokenizer's own threads."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already holds a prepared corpus."),
) -> None:
    """Tokenise a corpus of any size into DIR/manifest.json, DIR/tokenizer/, DIR/train/*.bin and
    DIR/heldout/*.bin, streaming: memory does not grow with the corpus (docs/data.md)."""
    from ..data.prepare import prepare as prepare_corpus
    from ..data.shards import PreparedData

    console = Console(stderr=True)
    bar = _Bar(console)
    try:
        out = prepare_corpus(sources, out, tokenizer=tokenizer, vocab_size=vocab_size, sample_bytes=sample_bytes,
                       text_field=text_field, heldout_fraction=heldout_fraction, max_bytes=max_bytes, shard_tokens=shard_tokens,
                       workers=workers, force=force, progress=bar.update)
    finally:
        bar.stop()
    data = PreparedData(out)
    for split in (data.train, data.heldout):
        Console().print(f"{split.name}: {split.documents:,} documents, {split.tokens:,} tokens in {len(split.shards)} shards")
    Console().print(f"wrote {out} ({data.dtype}, vocabulary {data.vocab_size:,}, manifest {out / 'manifest.json'})")


class _Bar:
    """A rich progress bar of documents, tokens and MB/s, started at the first batch written (after
    the worker processes are forked: no display thread is running when they are)."""

    def __init__(self, console: Console):
        self.console, self.progress, self.task = console, None, None

    def update(self, documents: int, tokens: int, n_bytes: int) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self.progress is None:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]prepare"), TextColumn("{task.fields[documents]:,} documents"),
                TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.completed:,.1f} MB"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console, transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("prepare", total=None, documents=0, tokens=0, rate="")
        elapsed = self.progress.tasks[0].elapsed or 0.0
        rate = f"{n_bytes / 1e6 / elapsed:.1f} MB/s" if elapsed > 0 else ""
        self.progress.update(self.task, completed=n_bytes / 1e6, documents=documents, tokens=tokens, rate=rate)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
