#!/usr/bin/env python3
"""Gather the SAML rows of ``local/run_saml.sh`` into ``<expdir>/saml_rows.json``.

Each row directory (``row1_fp32_base`` ... ``row4_nf4_saml``) holds the
``summary.json`` that ``python -m espnet_ext.bin.adapt_speaker`` wrote: per test
speaker the adaptation losses, seconds and adapter file size, and ``_decoding`` (WER /
CER of the held-out utterances, scored as asr.sh). Rows not run yet are left out.

    python3 local/saml_rows.py exp_cpu/saml --base exp_cpu/train_asr_conformer
"""

import argparse
import json
import statistics
from pathlib import Path

ROWS = (
    ("row1_fp32_base", "fp32 base"),
    ("row2_nf4_base", "NF4 base"),
    ("row3_nf4_lora", "NF4 + one LoRA adapted per speaker"),
    ("row4_nf4_saml", "NF4 + SAML adapted per speaker"),
)


def gather(expdir: Path, base: str) -> dict:
    rows = []
    for name, label in ROWS:
        path = expdir / name / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        decoding = summary.pop("_decoding", None)
        if decoding is None:
            continue
        speakers = list(summary.values())
        adapted = [s for s in speakers if s.get("train_losses")]
        rows.append(
            {
                "row": name,
                "label": label,
                "wer": decoding["wer"],
                "cer": decoding["cer"],
                "utterances": decoding["utterances"],
                "speakers": len(speakers),
                "adapt_utts": speakers[0]["adapt_utts"] if speakers else 0,
                "adapt_seconds_mean": (
                    statistics.mean(s["seconds"] for s in adapted) if adapted else 0.0
                ),
                "adapter_bytes_mean": (
                    statistics.mean(s["adapter_bytes"] for s in adapted)
                    if adapted
                    else 0
                ),
            }
        )
    return {"base": base, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("expdir", type=Path)
    p.add_argument("--base", required=True, help="the trained base's exp dir")
    args = p.parse_args()
    out = gather(args.expdir, args.base)
    path = args.expdir / "saml_rows.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for r in out["rows"]:
        print(
            f"{r['label']}: WER {r['wer']:.1f} CER {r['cer']:.1f} "
            f"({r['utterances']} utts)"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
