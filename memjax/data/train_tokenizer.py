"""Train a byte-level BPE tokenizer and save it for `data.tokenizer_path`.

  python -m memjax.data.train_tokenizer --input 'corpus/**/*.txt' --vocab_size 4096 --out tok.json
  python -m memjax.data.train_tokenizer --input stdlib --vocab_size 4096 --out tok.json

`--input stdlib` uses the training split of the embedded corpus (the validation documents a
training run holds out stay unseen); globs use every matched file.
"""

from __future__ import annotations

import argparse
import sys

import ml_collections

from memjax.data.sources import DataError, build_source
from memjax.data.tokenizers import BPETokenizer, sample_texts


def _data_cfg(args) -> ml_collections.ConfigDict:
    stdlib = args.input == "stdlib"
    return ml_collections.ConfigDict(
        {
            "source": "stdlib" if stdlib else args.source,
            "paths": "" if stdlib else args.input,
            "val_paths": "",
            "jsonl_field": args.jsonl_field,
            "val_fraction": 0.05 if stdlib else 0.0,
        }
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="'stdlib' or comma-separated file globs")
    parser.add_argument("--source", default="text", choices=["text", "jsonl", "arrayrecord"],
                        help="format of --input files")
    parser.add_argument("--jsonl_field", default="text")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    parser.add_argument("--max_bytes", type=int, default=20_000_000, help="train on about this much text")
    args = parser.parse_args(argv)

    try:
        source = build_source(_data_cfg(args), "train")
        texts = list(sample_texts(source, args.max_bytes))
        tokenizer = BPETokenizer.train(texts, args.vocab_size)
        tokenizer.save(args.out)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    print(f"saved {args.out}: vocab size {tokenizer.vocab_size}, trained on {len(texts)} documents ({n_bytes:,} bytes)")
    print(f"average bytes per token on the input: {n_bytes / max(n_tokens, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
