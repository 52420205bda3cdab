#!/usr/bin/env bash
# Install glm_session's Python dependencies on an offline GPU host that already has torch, transformers, lightning
# and torchmetrics (as the GPU hosts here do), from wheels gathered on a machine that can reach PyPI.
#
#   bash experiments/offline/wheels.sh gather [DIR]    # online: build or download the wheels into DIR (.whl)
#   bash experiments/offline/wheels.sh install [DIR]   # offline: pip install them into $SITE (/tmp/site)
#   export PYTHONPATH=/tmp/site:$PYTHONPATH             # then: python -m glm_session.train ...
#
# The packages below are pure Python, pinned to the versions the project is tested with; wheels are fetched for the
# host's Python ($PYTHON_VERSION, 3.12 on the GPU image) and built for those PyPI only has as sources. Everything
# else they need is on the GPU image already.
set -euo pipefail
action=${1:?usage: wheels.sh gather|install [DIR]}
dir=${2:-.whl}
site=${SITE:-/tmp/site}
python_version=${PYTHON_VERSION:-3.12}
wheels=(
    hydra-core==1.3.8 omegaconf==2.3.1                                 # configs
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19                  # cached data preparation
    nltk==3.10.4                                                       # rouge-score's tokenizer module, BLEU-4
    rouge-chinese==1.0.3                                               # ChatGLM2's official ROUGE
    peft==0.21.2 accelerate==1.16.0                                       # peft=lora
    liger-kernel==0.8.5                                                # speed=fast (the gpu extra; not on the GPU image)
)
sources=(antlr4-python3-runtime==4.9.3 rouge-score==0.1.2 jieba==0.42.1)
case $action in
    gather)
        mkdir -p "$dir"
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
            --dest "$dir" "${wheels[@]}"
        python3 -m pip wheel --quiet --no-deps --wheel-dir "$dir" "${sources[@]}"
        ls "$dir" ;;
    install)
        python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$dir"/*.whl
        echo "installed into $site: export PYTHONPATH=$site:\$PYTHONPATH" ;;
    *)
        echo "unknown action $action: gather or install" >&2; exit 2 ;;
esac
