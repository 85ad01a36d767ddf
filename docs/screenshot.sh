#!/usr/bin/env bash
# Full-page screenshot of a report with headless Chromium, offline (how docs/images/ were made):
#   docs/screenshot.sh RUN/report.html OUT.png [WIDTH]
# Background networking, sync and component updates are off: they would try to reach the net.
set -euo pipefail
html=$(realpath "$1"); out=$(realpath -m "$2"); width=${3:-1400}
profile=$(mktemp -d); trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size="$width,8000" --screenshot="$out" "file://$html" 2>/dev/null
# Cut the empty window below the page.
python - "$out" <<'PY'
import sys
import numpy as np
from PIL import Image
img = Image.open(sys.argv[1]).convert("RGB")
px = np.asarray(img)
used = np.nonzero((px != px[-1, 0]).any(axis=(1, 2)))[0]
img = img.crop((0, 0, img.width, min(img.height, used[-1] + 24)))
# 256 colours without dithering: a third of the size, text stays crisp.
img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(sys.argv[1], optimize=True)
PY
