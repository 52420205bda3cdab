#!/usr/bin/env bash
# Each issue-11, issue-19 and issue-20 item's command, and session 16's audit, and the last lines each prints:
# bash run.sh [WORK_DIR] > report.txt
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/glm_session_bad_input}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK" && python "$ROOT/experiments/bad_input/make_files.py"
C="data.cache_dir=$WORK/cache"
T="model=chatglm2-tiny trainer.enable_progress_bar=false $C"
item() { echo "### $1"; echo "\$ $2"; bash -c "$2" > out.txt 2>&1; echo "exit $?"; grep -v "^\s*$" out.txt | grep -E "$3" | tail -${4:-1}; }
item 1 "python -m glm_session.train $T data.limit=20 trainer.max_steps=2 trainer.limit_train_batches=1.0 hydra.run.dir=R && python -m glm_session.evaluate ckpt_path=R/checkpoints/last.ckpt limit=2 $C hydra.run.dir=E" "ROUGE|error"
item 2a "python -m glm_session.evaluate ckpt_path=R/checkpoints/last.ckpt data.max_seq_len=64 generation.max_new_tokens=64 $C hydra.run.dir=E2" "error|ROUGE"
item 2b "python -m glm_session.evaluate ckpt_path=R/checkpoints/last.ckpt limit=2 data.max_seq_len=64 generation.max_new_tokens=24 $C hydra.run.dir=E3 && python -c \"import json; m=json.load(open('E3/metrics.json')); print({k: m[k] for k in ('prompts','skipped_turns','prompts_with_dropped_history','prompt_tokens_max')})\"" "skipped|error|WARN" 2
item 3a "python -m glm_session.train $T data.max_seq_len=0" "error"
item 3b "python -m glm_session.train $T data.limit=-1" "error"
item 3c "python -m glm_session.train $T data.batch_size=0 data.batch_tokens=null" "error"
item 3d "python -m glm_session.train $T data.path=empty.jsonl" "error"
item 4 "python -m glm_session.data stats data.path=surrogate.jsonl $C" "error"
item 4s "python -m glm_session.data stats data.path=surrogate.jsonl data.on_error=skip $C" "skipped"
item 5a "python -m glm_session.data stats data.path=deep.jsonl $C" "error"
item 5b "python -m glm_session.data stats data.path=bigint.jsonl $C" "error"
item 6a "python -m glm_session.data stats data.path=history.jsonl $C" "error"
item 6b "python -m glm_session.data stats data.packing=maybe" "error"
item 6c "python -m glm_session.data stats 'data.holdout={validation: -0.1}'" "error"
item 6d "python -m glm_session.data stats data.path=dup.jsonl $C" "error"
item 7a "python -m glm_session.data stats data.path=system.jsonl $C" "error"
item 7b "python -m glm_session.data stats data.path=glmhist.jsonl $C" "error"
item 7c "python -m glm_session.data stats data.path=$WORK $C" "error"
item 8a "python -m glm_session.data stats 'data.role_map={client: user, counselor: assistant}' data.limit=5 $C" "sessions|error"
item 8b "python -m glm_session.data stats 'data.path=我的 数据.jsonl'" "error"
head -c 100000 R/checkpoints/last.ckpt > truncated.ckpt; python -c "import torch; torch.save({'model.w': torch.ones(2)}, 'plain.ckpt')"
item 9a "python -m glm_session.train $T ckpt_path=truncated.ckpt" "error"
item 9b "python -m glm_session.evaluate ckpt_path=plain.ckpt" "error"
item 9c "python -m glm_session.train model=chatglm2-small trainer.enable_progress_bar=false $C ckpt_path=R/checkpoints/last.ckpt" "error"
python -c "
import torch; c=torch.load('R/checkpoints/last.ckpt', weights_only=True); k=next(iter(c['state_dict'])); c['state_dict'][k].view(-1)[0]=float('nan'); torch.save(c,'nan.ckpt')"
item 10a "python -m glm_session.train $T ckpt_path=nan.ckpt" "error"
item 10b "PYTHONPATH=$ROOT/tests python -m glm_session.train $T data.limit=20 trainer.max_steps=6 trainer.limit_train_batches=1.0 callbacks.last_checkpoint.every_n_train_steps=1 +callbacks.poison._target_=helpers.PoisonAtStep +callbacks.poison.step=3 hydra.run.dir=P; python -c \"import torch; print('last.ckpt step', torch.load('P/checkpoints/last.ckpt', weights_only=True)['global_step'])\"" "error|last.ckpt" 2
item 11 "time python -m glm_session.train $T model.init_from=/no/such/folder" "error|real" 2
item 12 "python -m glm_session.train $T data.limit=20 strategy=split ckpt_path=R/checkpoints/last.ckpt" "error"
item 13 "cd $ROOT && python -m pytest -q tests/test_resume.py -k killed" "passed|failed"
mkdir -p R/checkpoints && echo half > R/checkpoints/.saving-0badc0de.tmp
item 14 "python -m glm_session.train $T data.limit=20 trainer.max_steps=4 trainer.limit_train_batches=1.0 ckpt_path=R/checkpoints/last.ckpt hydra.run.dir=R; echo; ls -a R/checkpoints | tr '\\n' ' '; echo" "removed|^\\. \\.\\. " 2
item 15a "python -m glm_session.train +data.x=1" "error"
item 15b "python -m glm_session.data export data.limit=2 out=$WORK $C" "error"
mkdir -p src && echo '[1, 2]' > src/config.json
item 15c "python -m glm_session.convert src dst" "error"
item 15d "python -m glm_session.train $T data.limit=3" "error"
item 16 "python -m glm_session.data stats data.path=long.jsonl data.max_seq_len=2048 $C" "warning"

# Issue 19: supervision policies.
item 19a "python -m glm_session.data stats supervision=positions 'supervision.weights=[1,-2]'" "error"
item 19b "python -m glm_session.train $T supervision=from_turn supervision.m=40" "error"
item 19c "python -m glm_session.data stats supervision=first" "error"
item 19d "python -m glm_session.data stats supervision=positions 'supervision.weights=[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]' $C" "error"
# Issue 20: signals, preemption, concurrency, full disks, code from checkpoints, moved data, texts, one line.
S="PYTHONPATH=$ROOT/tests python -m glm_session.train $T data.limit=20 trainer.max_epochs=2 trainer.limit_train_batches=1.0"
E='echo "(train exited $?)";'   # in an item of several commands, the exit code of the run
item 20-1a "$S trainer.accumulate_grad_batches=2 +callbacks.sig._target_=helpers.SignalAtStep +callbacks.sig.step=3 hydra.run.dir=SIG; $E python -c \"import json; m=json.load(open('SIG/metrics.json')); print({k: m[k] for k in ('status','signal','stopped_at_step')})\"" "stopped by|status|error|Traceback|exited" 3
item 20-1b "$S trainer.accumulate_grad_batches=2 ckpt_path=SIG/checkpoints/last.ckpt hydra.run.dir=SIG2" "validation loss|error"
item 20-1c "$S trainer.accumulate_grad_batches=2 hydra.run.dir=WHOLE" "validation loss|error"
item 20-1d "PYTHONPATH=$ROOT/tests python -m glm_session.train -m $T data.limit=20 trainer.limit_train_batches=1.0 trainer.max_epochs=1 seed=0,1,2 +callbacks.sig._target_=helpers.SignalAtStepIfSeed +callbacks.sig.step=2 +callbacks.sig.seed=1 '+callbacks.sig.run_seed=\${seed}' hydra.sweep.dir=SWEEP" "^sweep|stopped by|error" 4
mkdir -p bin && printf '#!/bin/sh\necho "scontrol $@" >> scontrol.log\n' > bin/scontrol && chmod +x bin/scontrol
SL="PATH=$WORK/bin:$PATH SLURM_NTASKS=1 SLURM_JOB_NAME=glm SLURM_JOB_ID=4242 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_NODELIST=localhost"
item 20-2a "$SL $S trainer.accumulate_grad_batches=2 +callbacks.sig._target_=helpers.SignalAtStep +callbacks.sig.step=3 +callbacks.sig.signal=SIGUSR1 hydra.run.dir=slurm/first; $E cat scontrol.log" "stopped by|scontrol|error|exited" 3
item 20-2b "$SL SLURM_RESTART_COUNT=1 $S trainer.accumulate_grad_batches=2 strategy=split hydra.run.dir=slurm/split" "error"
item 20-2c "$SL SLURM_RESTART_COUNT=1 $S trainer.accumulate_grad_batches=2 hydra.run.dir=slurm/relaunch" "resuming|validation loss|error" 2
item 20-3 "$S trainer.max_epochs=50 hydra.run.dir=BUSY > busy.txt 2>&1 & P=\$!; sleep 15; $S hydra.run.dir=BUSY; $E kill -TERM \$P; wait \$P; echo \"(the first run, sent SIGTERM, exited \$?)\"" "error|exited" 3
mkdir -p FULL && if mount -t tmpfs -o size=14M tmpfs FULL 2>/dev/null; then
item 20-4a "$S callbacks.last_checkpoint.every_n_train_steps=1 hydra.run.dir=FULL/run; $E ls -a FULL/run/checkpoints | tr '\\n' ' '; echo; python -c \"import json, torch; print('last.ckpt step', torch.load('FULL/run/checkpoints/last.ckpt', weights_only=True)['global_step'], json.load(open('FULL/run/metrics.json'))['status'])\"" "error|Traceback|last.ckpt|exited" 4
umount FULL; else echo "### 20-4a"; echo "skipped: no tmpfs could be mounted here"; fi
item 20-4b "PYTHONPATH=$ROOT/tests python -m glm_session.train $T data.limit=20 trainer.max_epochs=2 trainer.limit_train_batches=1.0 callbacks.last_checkpoint.every_n_train_steps=1 +callbacks.full._target_=helpers.FullDiskAfterStep +callbacks.full.step=3 hydra.run.dir=FULL2; $E python -c \"import json; print(json.load(open('FULL2/metrics.json'))['status'])\"" "error|Traceback|failed|exited" 3
python -c "
import torch; c=torch.load('R/checkpoints/last.ckpt', weights_only=True); m=c['glm_session']['model_config']
m.update(attn_implementation='kernels-community/flash-attn', auto_map={'AutoModelForCausalLM': 'evil.Model'}); torch.save(c, 'kernel.ckpt')"
item 20-5 "python -m glm_session.evaluate ckpt_path=kernel.ckpt limit=1 $C hydra.run.dir=E5" "ignored|ROUGE|error" 2
mkdir -p moved && cp "$ROOT"/glm_session/resources/kdconv/*.jsonl moved/ && head -n 15 moved/train.jsonl > moved/fewer.jsonl
M="data.validation_path=moved/validation.jsonl data.test_path=moved/test.jsonl"
item 20-6a "python -m glm_session.train $T data.limit=20 trainer.max_steps=5 trainer.limit_train_batches=1.0 data.train_path=moved/train.jsonl $M ckpt_path=R/checkpoints/last.ckpt hydra.run.dir=MOVED" "same content|error"
item 20-6b "python -m glm_session.train $T data.limit=20 trainer.max_steps=5 trainer.limit_train_batches=1.0 data.train_path=moved/fewer.jsonl $M ckpt_path=R/checkpoints/last.ckpt hydra.run.dir=FEWER" "error"
item 20-7a "python -m glm_session.data stats data.path=invisible.jsonl $C" "error"
item 20-7b "python -m glm_session.data stats data.path=invisible.jsonl data.on_error=skip $C" "skipped_records|skipped:" 2
item 20-7c "python -m glm_session.data stats data.path=nfd.jsonl $C; python -m glm_session.data stats data.path=nfd.jsonl data.normalize=NFC $C" "nfc|normalized" 4
item 20-8a "python -m glm_session.train $T data.limit=abc" "." 3
item 20-8b "python -m glm_session.evaluate ckpt_path=no.ckpt" "." 3
item 20-8c "python -m glm_session.train -m $T data.limit=4 trainer.max_steps=1 trainer.limit_train_batches=1.0 data.max_seq_len=1024,0 hydra.sweep.dir=FAILSWEEP" "error|Error executing|Traceback" 3
# Session 16's audit (2026-12-05): what two reviewers found still taken silently or ending in a traceback.
item a1 "python -m glm_session.train $T optimizer.lr=0" "error"
item a2 "python -m glm_session.train $T trainer.gradient_clip_val=-1" "error"
item a3 "python -m glm_session.train $T trainer.accumulate_grad_batches=0" "error"
item a4 "python -m glm_session.train $T scheduler.warmup_ratio=2" "error"
item a5 "python -m glm_session.data stats split=foo" "error"
item a6 "python -m glm_session.data stats 'data.holdout={validation: 0.5}'" "error"
printf '%s\n' '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}' > both.jsonl
item a7 "python -m glm_session.data stats data.path=both.jsonl $C" "error"
item a8 "python -m glm_session.train $T model.attn_implementation=flex_attention trainer.accelerator=cpu" "error"
item a9 "python -m glm_session.train $T data.limit=20 data.max_seq_len=24 strategy=split trainer.max_steps=1 trainer.limit_train_batches=1.0 hydra.run.dir=SHORT" "WARNING.*turns"
python -m glm_session.export R/checkpoints/last.ckpt BASE > /dev/null 2>&1
L="python -m glm_session.train $T peft=lora model.peft.rank=4 model.init_from=BASE data.limit=20 trainer.limit_train_batches=1.0"
item a10 "$L trainer.max_steps=2 hydra.run.dir=LORA && python -m glm_session.export LORA/checkpoints/last.ckpt ADAPTER --adapter" "wrote|error"
item a11 "$L trainer.max_steps=3 ckpt_path=R/checkpoints/last.ckpt hydra.run.dir=LORA2" "error"
item a12 "$L trainer.max_steps=3 model.peft.rank=8 resume_allow_changes=true ckpt_path=LORA/checkpoints/last.ckpt hydra.run.dir=LORA3" "error"
item a13 "$L trainer.max_steps=3 model.peft.alpha=64 model.init_adapter=ADAPTER hydra.run.dir=LORA4" "error"
cp -r ADAPTER ADAPTER_CUT && head -c 2000 ADAPTER/adapter_model.safetensors > ADAPTER_CUT/adapter_model.safetensors
item a14 "$L trainer.max_steps=3 model.init_adapter=ADAPTER_CUT hydra.run.dir=LORA5" "error"
item a15 "python -m glm_session.analysis measure measure.sessions=2 measure.ckpt_path=LORA/checkpoints/last.ckpt tokenizer=zhbase $C out_dir=AN" "error"
item a16 "echo 你好 | python -m glm_session.chat ckpt_path=R/checkpoints/last.ckpt max_seq_len=0" "error"
mkdir -p REP && cp -r R REP/run && python -c "import json; p='REP/run/metrics.json'; m=json.load(open(p)); m['val_curve']=[1.0]; json.dump(m, open(p, 'w'))"
item a17 "python -m glm_session.report REP" "error"
# Session 18's audit (2026-12-05): three helper agents tried about 440 bad inputs (data, training, the commands
# after training) and found about 55 that were tracebacks, silently taken, or named the wrong key or file.
cp "$ROOT"/glm_session/resources/kdconv/test.jsonl mine.jsonl && cp mine.jsonl lines_named.json
item b1 "python -m glm_session.data stats data.path=mine.jsonl data.cache_dir=CB > /dev/null 2>&1; python -m glm_session.data stats data.path=lines_named.json data.cache_dir=CB" "error|sessions"
item b2 "python -m glm_session.data export data.path=mine.jsonl out=mine.jsonl $C" "error"
python -c "
import lzma, json
rec = lambda q: (json.dumps({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': 'a'}]}) + '\n').encode()
damaged = bytearray(lzma.compress(rec('q2'))); damaged[0] ^= 255
open('two_streams.jsonl.xz', 'wb').write(lzma.compress(rec('q1')) + bytes(damaged))
open('dupkey.jsonl', 'w').write('{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}], \"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n')
open('weight0.jsonl', 'w').write(json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'bad', 'weight': 0}]}) + '\n')
open('escape.jsonl', 'w').write(json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': '\x1b[31mred'}]}) + '\n')"
item b3 "python -m glm_session.data stats data.path=two_streams.jsonl.xz $C" "error"
item b4 "python -m glm_session.data stats data.path=dupkey.jsonl $C" "error"
item b5 "python -m glm_session.data stats data.path=weight0.jsonl $C" "error"
item b6 "python -m glm_session.data stats data.path=escape.jsonl $C" "error"
item b7 "python -m glm_session.data stats 'data.role_map={1: user}' $C" "error"
item b8 "python -m glm_session.data stats data.path=mine.jsonl 'data.holdout={validation: 0.99}' $C" "error"
item b9 "python -m glm_session.train $T data.limit=20 trainer.max_steps=3 trainer.limit_train_batches=1.0 optimizer.lr=0.05 ckpt_path=R/checkpoints/last.ckpt hydra.run.dir=RLR" "error"
item b10 "python -m glm_session.train $T data.limit=20 trainer.max_steps=2 trainer.limit_train_batches=1.0 ckpt_path=R/checkpoints/last.ckpt hydra.run.dir=RDONE" "error"
item b11 "python -m glm_session.train $T data.limit=20 trainer.max_steps=2 trainer.limit_train_batches=1.0 trainer.devices=2 trainer.accelerator=cpu hydra.run.dir=DEV2" "validation loss|error|run folder" 2
item b12 "python -m glm_session.train $T seed=-1" "error"
item b13 "python -m glm_session.train $T resume_allow_changes=maybe" "error"
item b14 "python -m glm_session.train $T +model.config_overrides.num_hiden_layers=4" "error"
item b15 "python -m glm_session.train $T data.limit=20 trainer.limit_train_batches=1.0 trainer.accumulate_grad_batches=100" "error"
item b16 "python -m glm_session.train scheduler=null" "error"
item b17 "$L trainer.max_steps=2 model.init_from=null model.init_adapter=ADAPTER hydra.run.dir=LORA6" "error"
item b18 "printf '\\xff\\xfe\\x80bad\\n' | python -m glm_session.chat ckpt_path=R/checkpoints/last.ckpt generation.max_new_tokens=4" "not sent|error|Error"
item b19 "echo 你好 | python -m glm_session.chat ckpt_path=R/checkpoints/last.ckpt generation.temperature=5.0" "error"
item b20 "python -m glm_session.export R/checkpoints/last.ckpt X --dtype fp16" "."
item b21 "python -m glm_session.export LORA/checkpoints/last.ckpt ADAPTER_BF16 --adapter --dtype bfloat16 && python -c \"from safetensors.torch import load_file; print({str(t.dtype) for t in load_file('ADAPTER_BF16/adapter_model.safetensors').values()})\"" "bfloat16|error"
python -c "import json; p='BASE/config.json'; c=json.load(open(p)); c['rms_norm_eps']=1e-6; json.dump(c, open('eps.json', 'w'))" && mkdir -p BASE_EPS && cp BASE/*.safetensors BASE_EPS/ && mv eps.json BASE_EPS/config.json
item b22 "python -m glm_session.train $T model.init_from=BASE_EPS" "error"
python -c "import torch, zipfile; z=zipfile.ZipFile('R/checkpoints/last.ckpt'); i=next(i for i in z.infolist() if i.filename.endswith('/data/0')); b=bytearray(open('R/checkpoints/last.ckpt','rb').read()); h=b[i.header_offset:i.header_offset+30]; o=i.header_offset+30+int.from_bytes(h[26:28],'little')+int.from_bytes(h[28:30],'little'); b[o]^=1; open('flipped.ckpt','wb').write(b)"
item b23 "python -m glm_session.evaluate ckpt_path=flipped.ckpt limit=1 $C hydra.run.dir=EF" "error|ROUGE"
mkdir -p REP2 && cp -r R REP2/run && printf '{"status": "completed", "val_cu' > REP2/run/metrics.json
item b24 "python -m glm_session.report REP2" "error"
item b25 "python -m glm_session.analysis" "error"
