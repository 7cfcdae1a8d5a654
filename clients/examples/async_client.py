"""The asyncio client: score transactions and detect an image concurrently.

python clients/examples/async_client.py --url http://localhost:8000
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np

from clients import AsyncVolleyClient

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "samples" / "street-1.jpg"


async def run(url: str, image: Path) -> None:
    async with AsyncVolleyClient(url) as client:
        print("models:", ", ".join(f"{m.name} ({m.state})" for m in await client.models()))
        # Four transactions as an array of the 17 raw columns, already in the model's order.
        rows = np.random.default_rng(0).gamma(2.0, 2.0, size=(4, 17)).astype(np.float32)
        scores, detections = await asyncio.gather(client.score(rows), client.detect(image))
    print("fraud scores:", " ".join(f"{s:.4f}" for s in scores.scores))
    print("flagged:", int(scores.decisions.sum()), "of", len(scores))
    labels = " ".join(d.class_name for d in detections)
    print(f"{image.name}: {len(detections)} detection(s): {labels}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="host:port (gRPC) or http://...")
    parser.add_argument("--image", type=Path, default=SAMPLE)
    args = parser.parse_args()
    asyncio.run(run(args.url, args.image))


if __name__ == "__main__":
    main()
