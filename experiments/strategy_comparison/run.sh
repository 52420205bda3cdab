#!/usr/bin/env bash
# The whole strategy comparison on one GPU, in under 10 minutes (an H200 here):
#   1. pretrain the shared starting point (experiment=pretrain_lm): its best checkpoint is every arm's init_from;
#   2. the 18-job sweep (python -m glm_session.train -m +sweep=strategy_x_reduction) as 6 Hydra multiruns side by
#      side, one per strategy x reduction, each over the 3 seeds (chatglm2-small leaves most of the GPU idle);
#   3. pack every job's metrics, evaluation and failure note into OUT/sweep.tgz.
# Aggregate afterwards (CPU): python experiments/strategy_comparison/aggregate.py ROOT/sweep --weights ...
#
#   bash experiments/strategy_comparison/run.sh [ROOT=outputs/strategy_comparison] [OUT=ROOT] [SWEEP_SECONDS=440]
# $EXTRA: more train overrides for every run (e.g. a smaller model to try the script on a CPU).
set -uo pipefail
root=${1:-outputs/strategy_comparison}
out=${2:-$root}
budget=${3:-440}
data="data.max_seq_len=2048 data.packing=true data.batch_tokens=16384 split=all"
quiet="trainer.enable_progress_bar=false ${EXTRA:-}"
mkdir -p "$root/logs" "$out"

for strategy in lm split session; do  # build the sample caches once, before the parallel jobs read them
    python -m glm_session.data stats strategy=$strategy $data ${DATA_EXTRA:-} out="$root/logs/data_$strategy.json" >/dev/null
done
python -m glm_session.train experiment=pretrain_lm $quiet hydra.run.dir="$root/pretrain" >"$root/logs/pretrain.log" 2>&1
init=$(ls "$root"/pretrain/checkpoints/best-*.ckpt | head -1)
tail -n 3 "$root/logs/pretrain.log"
echo "init_from: $init"

for strategy in split session; do
    for loss in token sample turn; do
        GLM_SESSION_INIT="$init" timeout "$budget" python -m glm_session.train -m +sweep=strategy_x_reduction \
            experiment=finetune_$strategy loss=$loss $quiet hydra.sweep.dir="$root/sweep" \
            >"$root/logs/sweep_${strategy}_$loss.log" 2>&1 &
    done
done
wait
ls "$root/sweep"
cd "$root" && tar czf "$out/sweep.tgz" --ignore-failed-read pretrain/metrics.json pretrain/data_stats.json logs \
    sweep/*/metrics.json sweep/*/data_stats.json sweep/*/failed.txt sweep/*/.hydra/overrides.yaml \
    sweep/*/evaluation/metrics.json sweep/*/evaluation/predictions.jsonl 2>/dev/null
ls -la "$out"
