#!/usr/bin/env bash
# The git-ignored folders that the device calls of this experiment carry (README "Commands"), built from the shared
# data folder and the offline wheels; this machine keeps neither between sessions.
#
#   bash experiments/unseen_base/carry.sh [DATA]      # DATA: ../shared/data
#
# .carry:  zhbase as .jsonl.xz (xz -9: 40.5 MB; the same bytes every time, so the data's content key stays the same),
#          CPsyCoun (2 MB: the probe's runs) and every wheel but jieba's, so that the tracked tree (its .tgz archives
#          left behind) plus .carry stay under a call's 64 MiB;
# .carry2: SMILE, CPsyCoun and every wheel (jieba for ROUGE, liger-kernel for speed=fast).
set -euo pipefail
data=$(realpath "${1:-../shared/data}")
cd "$(dirname "$0")/../.."
bash experiments/offline/wheels.sh gather .whl > /dev/null  # (downloads only what .whl lacks)
mkdir -p .carry/zhbase .carry/wheels .carry2/wheels
for name in books_pd laws medqa_sample; do
    target=.carry/zhbase/$name.jsonl.xz
    [ -f "$target" ] || (zcat "$data/zhbase/$name.jsonl.gz" | xz -9 -T1 > "$target.partial" && mv "$target.partial" "$target") &
done
wait
find .whl -type f -name '*.whl' ! -name 'jieba-*' -exec cp {} .carry/wheels/ \;
cp .whl/*.whl .carry2/wheels/
cp "$data/cpsycoun/cpsycound.jsonl.gz" .carry/
cp "$data/smile/smile_20k.jsonl.gz" "$data/cpsycoun/cpsycound.jsonl.gz" .carry2/
for folder in /.whl/ /.carry/ /.carry2/; do
    grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude
done
du -sh .carry .carry2
