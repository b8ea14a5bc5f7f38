#!/usr/bin/env bash
# DeepNorm vs Post-LN on German->English Tatoeba, end to end on a CPU:
#   split -> SentencePiece -> fairseq-preprocess -> train both models in parallel
#   -> fairseq-generate -> sacreBLEU -> loss plot + summary.json
#
# Both models use exactly the same command line; the only difference is --deepnorm.
# Run it with the project's venv on PATH (`make demo` does that):
#     PATH=.venv/bin:$PATH bash scripts/demo.sh
# Every knob is an environment variable (defaults below), e.g.
#     DEMO_UPDATES=200 DEMO_LAYERS=6 DEMO_OUT=runs/quick bash scripts/demo.sh
# Each model trains for exactly DEMO_UPDATES updates with one CPU thread and a fixed seed, so the
# numbers do not depend on the machine's speed, only the time does. DEMO_MAX_MINUTES is a safety
# net: a model that hits it stops early, the demo reports the run as INCOMPLETE (exit status 3,
# no BLEU) and prints the command that finishes the same run (DEMO_RESUME=1: fairseq continues
# from checkpoint_last.pt, optimizer state included, to the same DEMO_UPDATES).
# DEMO_STAGE=data stops after preparing the data (used by deepnet-analyze and deepnet-sweep).
# Your own corpus: DEMO_TSV=pairs.tsv (columns: target, source[, attribution]) or
#     DEMO_SRC=corpus.de DEMO_TGT=corpus.en (line-aligned plain text). See docs/demo.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

# ---- knobs ------------------------------------------------------------------------------------
# The knobs the caller set, for the resume command printed when the safety cap stops a run.
USER_KNOBS=()
for knob in PYTHON $(compgen -e | grep '^DEMO_' | sort); do
    [[ $knob == DEMO_RESUME || $knob == DEMO_MAX_MINUTES || -z ${!knob+x} ]] || USER_KNOBS+=("$knob=${!knob}")
done
DEMO_OUT=${DEMO_OUT:-runs/demo}                       # everything is written under here
DEMO_LAYERS=${DEMO_LAYERS:-12}                        # encoder layers = decoder layers
DEMO_UPDATES=${DEMO_UPDATES:-1150}                    # training updates per model (fixes the result)
DEMO_MAX_MINUTES=${DEMO_MAX_MINUTES:-60}              # safety net on each model's training time (0: none)
DEMO_RESUME=${DEMO_RESUME:-0}                         # 1: finish a run the safety net stopped
DEMO_TSV=${DEMO_TSV:-data/tatoeba-deu-eng/deu-eng.tsv.gz}
DEMO_SRC=${DEMO_SRC:-}                                # own parallel text instead of DEMO_TSV ...
DEMO_TGT=${DEMO_TGT:-}                                # ... (both, line-aligned)
DEMO_SRC_LANG=${DEMO_SRC_LANG:-de}
DEMO_TGT_LANG=${DEMO_TGT_LANG:-en}
DEMO_PAIRS=${DEMO_PAIRS:-0}                           # use only ~this many pairs (0 = all)
DEMO_VALID_PAIRS=${DEMO_VALID_PAIRS:-500}
DEMO_TEST_PAIRS=${DEMO_TEST_PAIRS:-500}
DEMO_VOCAB=${DEMO_VOCAB:-4000}                        # joint SentencePiece unigram vocabulary
DEMO_DIM=${DEMO_DIM:-64}
DEMO_FFN=${DEMO_FFN:-256}
DEMO_HEADS=${DEMO_HEADS:-4}
DEMO_MAX_TOKENS=${DEMO_MAX_TOKENS:-2000}
DEMO_LR=${DEMO_LR:-1.5e-3}
DEMO_WARMUP=${DEMO_WARMUP:-200}
DEMO_DROPOUT=${DEMO_DROPOUT:-0.1}
DEMO_LABEL_SMOOTHING=${DEMO_LABEL_SMOOTHING:-0.1}
DEMO_LOG_INTERVAL=${DEMO_LOG_INTERVAL:-10}
DEMO_BEAM=${DEMO_BEAM:-5}
DEMO_PROGRESS_SECONDS=${DEMO_PROGRESS_SECONDS:-20}    # how often to print a progress line
DEMO_SEED=${DEMO_SEED:-1}

MODELS=(deepnorm postln)
declare -A MODEL_FLAGS=([deepnorm]="--deepnorm" [postln]="")

OUT=$DEMO_OUT
DATA=$OUT/data
PY=${PYTHON:-python}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in "$PY" fairseq-preprocess fairseq-train fairseq-generate; do
    command -v "$tool" >/dev/null || die "$tool not found: run 'make demo', or put .venv/bin on PATH"
done

START=$EPOCHREALTIME
mkdir -p "$OUT"

# ---- 1-3. data: split, SentencePiece, binarize (reused while the inputs are unchanged) ---------
if [[ -n $DEMO_SRC || -n $DEMO_TGT ]]; then
    [[ -n $DEMO_SRC && -n $DEMO_TGT ]] || die "DEMO_SRC and DEMO_TGT go together"
    INPUT_ARGS=(--src "$DEMO_SRC" --tgt "$DEMO_TGT")
    INPUT_FILES=("$DEMO_SRC" "$DEMO_TGT")
else
    INPUT_ARGS=(--tsv "$DEMO_TSV")
    INPUT_FILES=("$DEMO_TSV")
fi
for f in "${INPUT_FILES[@]}"; do [[ -f $f ]] || die "input file $f does not exist"; done

# The stamp covers the input bytes, the data knobs and the scripts that turn one into the other.
DATA_KEY=$(
    {
        sha256sum "${INPUT_FILES[@]}" | cut -d' ' -f1
        sha256sum scripts/split_corpus.py scripts/spm_train.py scripts/deepnet_recipes/tools.py | cut -d' ' -f1
        echo "${INPUT_ARGS[*]} $DEMO_SRC_LANG $DEMO_TGT_LANG $DEMO_PAIRS $DEMO_VALID_PAIRS $DEMO_TEST_PAIRS"
        echo "$DEMO_VOCAB $DEMO_SEED"
        "$PY" -c 'from importlib.metadata import version as v; print(v("fairseq-fixed"), v("sentencepiece"))' 2>/dev/null
    } | sha256sum | cut -c1-16
)
SRC=$DEMO_SRC_LANG
TGT=$DEMO_TGT_LANG

if [[ -f $DATA/stamp && $(cat "$DATA/stamp") == "$DATA_KEY" && -f $DATA/bin/dict.$SRC.txt ]]; then
    say "data: reusing $DATA (stamp $DATA_KEY; inputs unchanged)"
else
    [[ $DEMO_RESUME == 1 ]] && die "DEMO_RESUME=1 but the data in $DATA is missing or was made from other inputs" \
        "or data knobs (DEMO_TSV/SRC/TGT, *_LANG, *_PAIRS, DEMO_VOCAB, DEMO_SEED): resume with the same ones"
    rm -rf "$DATA"
    mkdir -p "$DATA"
    say "1/6 split ${INPUT_FILES[*]} by $TGT sentence"
    "$PY" scripts/split_corpus.py "${INPUT_ARGS[@]}" --src-lang "$SRC" --tgt-lang "$TGT" \
        --out-dir "$DATA/text" --valid-size "$DEMO_VALID_PAIRS" --test-size "$DEMO_TEST_PAIRS" \
        --max-pairs "$DEMO_PAIRS" --seed "$DEMO_SEED"

    say "2/6 SentencePiece: joint unigram model (vocabulary ~$DEMO_VOCAB) on train.$SRC + train.$TGT"
    ENCODE=()
    for split in train valid test; do
        for lang in "$SRC" "$TGT"; do ENCODE+=("$DATA/text/$split.$lang:$DATA/spm/$split.$lang"); done
    done
    mkdir -p "$DATA/spm"
    "$PY" scripts/spm_train.py --input "$DATA/text/train.$SRC" "$DATA/text/train.$TGT" \
        --model-prefix "$DATA/spm/spm" --vocab-size "$DEMO_VOCAB" --encode "${ENCODE[@]}"

    say "3/6 fairseq-preprocess --joined-dictionary ($SRC -> $TGT)"
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary --workers 1 \
        --trainpref "$DATA/spm/train" --validpref "$DATA/spm/valid" --testpref "$DATA/spm/test" \
        --destdir "$DATA/bin" > "$DATA/preprocess.log" 2>&1 \
        || { tail -n 20 "$DATA/preprocess.log" >&2; die "fairseq-preprocess failed (log: $DATA/preprocess.log)"; }
    grep -E 'Dictionary|sents' "$DATA/preprocess.log" | sed 's/^.*preprocess:/  /'
    echo "$DATA_KEY" > "$DATA/stamp"
fi

if [[ ${DEMO_STAGE:-all} == data ]]; then  # deepnet-analyze / deepnet-sweep only need the data
    say "data ready: $DATA/bin"
    exit 0
fi

# ---- 4. train both models in parallel, one CPU thread each --------------------------------------
TRAIN_ARGS=(
    "$DATA/bin" --user-dir "$REPO/deepnet_fairseq" --arch deepnet_transformer
    --encoder-layers "$DEMO_LAYERS" --decoder-layers "$DEMO_LAYERS"
    --encoder-embed-dim "$DEMO_DIM" --decoder-embed-dim "$DEMO_DIM"
    --encoder-ffn-embed-dim "$DEMO_FFN" --decoder-ffn-embed-dim "$DEMO_FFN"
    --encoder-attention-heads "$DEMO_HEADS" --decoder-attention-heads "$DEMO_HEADS"
    --share-all-embeddings --dropout "$DEMO_DROPOUT"
    --criterion label_smoothed_cross_entropy --label-smoothing "$DEMO_LABEL_SMOOTHING"
    --optimizer adam --adam-betas "(0.9,0.98)" --lr "$DEMO_LR"
    --lr-scheduler inverse_sqrt --warmup-updates "$DEMO_WARMUP" --warmup-init-lr 1e-7
    --max-tokens "$DEMO_MAX_TOKENS" --max-update "$DEMO_UPDATES"
    --seed "$DEMO_SEED" --cpu --num-workers 0
    # batch sizes need not be multiples of 8 on a CPU (fairseq main would also drop a smaller
    # last batch; the plugin restores it, see deepnet_fairseq/compat.py)
    --required-batch-size-multiple 1
    --log-format json --log-interval "$DEMO_LOG_INTERVAL" --no-progress-bar
    --no-epoch-checkpoints  # the optimizer state stays in checkpoint_last.pt, for DEMO_RESUME=1
)
# The safety net is not part of the run's identity: a resumed run may be given another one. fairseq
# counts the training time of earlier segments too (saved in the checkpoint).
CAP_ARGS=(--stop-time-hours "$(awk "BEGIN { print $DEMO_MAX_MINUTES / 60 }")")
if [[ $DEMO_RESUME == 1 ]]; then
    [[ -f $OUT/train_args.txt ]] || die "DEMO_RESUME=1 but $OUT/train_args.txt does not exist: nothing to resume"
    [[ $(cat "$OUT/train_args.txt") == "$(printf '%s\n' "${TRAIN_ARGS[@]}")" ]] || die \
        "DEMO_RESUME=1 needs the same settings as the stopped run; they differ from $OUT/train_args.txt:
$(diff <(cat "$OUT/train_args.txt") <(printf '%s\n' "${TRAIN_ARGS[@]}") | grep '^[<>]')"
elif [[ $DEMO_RESUME != 0 ]]; then
    die "DEMO_RESUME must be 0 or 1, not '$DEMO_RESUME'"
fi
printf '%s\n' "${TRAIN_ARGS[@]}" > "$OUT/train_args.txt"

model_state() {  # NAME -> complete | diverged | capped | unknown, from fairseq's messages in its log
    local log=$OUT/$1/train.log
    if grep -q "Stopping training due to num_updates: $DEMO_UPDATES >= max_update: $DEMO_UPDATES" "$log" 2>/dev/null; then
        echo complete
    elif grep -q -E 'FloatingPointError|Nan/Inf' "$log" 2>/dev/null; then
        echo diverged
    elif grep -q 'Stopping training due to cumulative_training_time' "$log" 2>/dev/null; then
        echo capped
    else
        echo unknown
    fi
}

train_one() {  # NAME: writes $OUT/NAME/{train.log,exit_code,wall_seconds,checkpoints/}
    # One thread per model: fairseq on a CPU is deterministic then, so the same seed and number of
    # updates give the same model on any machine (and after a resume), however fast or busy it is.
    local name=$1 dir=$OUT/$1 t0=$EPOCHREALTIME rc=0 before
    before=$(cat "$dir/wall_seconds" 2>/dev/null || echo 0)
    # shellcheck disable=SC2086  # MODEL_FLAGS is a (possibly empty) flag list
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-train "${TRAIN_ARGS[@]}" "${CAP_ARGS[@]}" ${MODEL_FLAGS[$name]} \
        --save-dir "$dir/checkpoints" >> "$dir/train.log" 2>&1 || rc=$?
    echo "$rc" > "$dir/exit_code"
    awk "BEGIN { printf \"%.1f\n\", $before + $EPOCHREALTIME - $t0 }" > "$dir/wall_seconds"
}

progress_line() {  # NAME -> "NAME: update U/N train loss L, valid loss V"
    local log=$OUT/$1/train.log train valid
    train=$(grep '| train_inner |' "$log" 2>/dev/null | tail -n 1 || true)
    valid=$(grep '| valid |' "$log" 2>/dev/null | tail -n 1 || true)
    printf '%-9s update %5s/%s  train loss %-7s valid loss %s' "$1:" \
        "$(sed -n 's/.*"num_updates": "\([0-9]*\)".*/\1/p' <<< "$train")" "$DEMO_UPDATES" \
        "$(sed -n 's/.*"loss": "\([^"]*\)".*/\1/p' <<< "$train")" \
        "$(sed -n 's/.*"valid_loss": "\([^"]*\)".*/\1/p' <<< "$valid")"
}

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

TO_TRAIN=()
for name in "${MODELS[@]}"; do
    if [[ $DEMO_RESUME == 1 ]]; then
        case $(model_state "$name") in
            complete) echo "$name: already trained to $DEMO_UPDATES updates ($OUT/$name)"; continue ;;
            diverged) echo "$name: diverged (NaN/Inf) before the cap; kept as it is ($OUT/$name)"; continue ;;
            capped) [[ -f $OUT/$name/checkpoints/checkpoint_last.pt ]] \
                || die "$name: no $OUT/$name/checkpoints/checkpoint_last.pt to resume from" ;;
            *) die "$name: $OUT/$name/train.log shows no run stopped by the time cap; cannot resume it" ;;
        esac
        echo "$name: resuming from $OUT/$name/checkpoints/checkpoint_last.pt"
    else
        rm -rf "${OUT:?}/$name"
        mkdir -p "$OUT/$name"
    fi
    TO_TRAIN+=("$name")
done
cap_text="safety cap ${DEMO_MAX_MINUTES} min each"
[[ $DEMO_MAX_MINUTES == 0 ]] && cap_text="no time cap"
say "4/6 training ${TO_TRAIN[*]} in parallel, one CPU thread each: ${DEMO_LAYERS}L-${DEMO_LAYERS}L, d=$DEMO_DIM," \
    "$DEMO_UPDATES updates ($cap_text); logs: $OUT/<model>/train.log"
for name in "${TO_TRAIN[@]}"; do
    train_one "$name" &
    PIDS+=($!)
done
while true; do
    running=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    (( running )) || break
    for ((i = 0; i < DEMO_PROGRESS_SECONDS && running; i++)); do
        sleep 1
        running=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    done
    elapsed=$(awk "BEGIN { printf \"%d\", $EPOCHREALTIME - $START }")
    printf '[%dm%02ds]' $((elapsed / 60)) $((elapsed % 60))
    for name in "${MODELS[@]}"; do printf '  %s |' "$(progress_line "$name")"; done
    echo
done
for pid in "${PIDS[@]}"; do wait "$pid" || true; done
PIDS=()

TRAINED=()
CAPPED=()
for name in "${MODELS[@]}"; do
    rc=$(cat "$OUT/$name/exit_code")
    if [[ $rc == 0 && $(model_state "$name") == capped ]]; then
        CAPPED+=("$name")
    elif [[ $rc == 0 ]]; then
        TRAINED+=("$name")
    elif grep -q -E 'FloatingPointError|Nan/Inf|nan' "$OUT/$name/train.log"; then
        echo "$name: training stopped on a NaN/Inf (diverged); see $OUT/$name/train.log"
        [[ -f $OUT/$name/checkpoints/checkpoint_last.pt ]] && TRAINED+=("$name")
    else
        tail -n 25 "$OUT/$name/train.log" >&2
        die "fairseq-train failed for $name (exit $rc; log: $OUT/$name/train.log)"
    fi
done

if (( ${#CAPPED[@]} )); then
    resume=(DEMO_RESUME=1 DEMO_MAX_MINUTES=0 "${USER_KNOBS[@]}")
    printf -v resume_line '%q ' "${resume[@]}"
    resume_line+="PATH=$(printf '%q' "$(dirname "$(command -v fairseq-train)")"):\$PATH bash $(printf '%q' "$REPO/scripts/demo.sh")"
    {
        printf '\n!! INCOMPLETE RUN: the %s-minute safety cap (DEMO_MAX_MINUTES) stopped' "$DEMO_MAX_MINUTES"
        for name in "${CAPPED[@]}"; do
            printf ' %s at update %s,' "$name" \
                "$(sed -n 's/.*Preparing to save checkpoint for epoch [0-9]* @ \([0-9]*\) updates.*/\1/p' "$OUT/$name/train.log" | tail -n 1)"
        done
        printf ' before its %s updates.\n' "$DEMO_UPDATES"
        echo "!! This machine is slower or busier than the demo expects. No BLEU is reported for an unfinished"
        echo "!! run (it would depend on the machine's speed). To finish the same run, from checkpoint_last.pt"
        echo "!! and with the same result as an uninterrupted one, run:"
        echo "$resume_line"
    } >&2
    exit 3
fi

# ---- 5. translate the test set (both models in parallel) and score with sacreBLEU ---------------
say "5/6 fairseq-generate on test (beam $DEMO_BEAM) and sacreBLEU against the raw $TGT references"
for name in "${TRAINED[@]}"; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-generate "$DATA/bin" --user-dir "$REPO/deepnet_fairseq" \
        --path "$OUT/$name/checkpoints/checkpoint_last.pt" --gen-subset test --source-lang "$SRC" \
        --target-lang "$TGT" --beam "$DEMO_BEAM" --batch-size 64 --required-batch-size-multiple 1 --max-len-a 1.5 --max-len-b 10 \
        --remove-bpe sentencepiece --cpu --num-workers 0 \
        > "$OUT/$name/generate.out" 2> "$OUT/$name/generate.log" &
    PIDS+=($!)
done
for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}" || { tail -n 20 "$OUT/${TRAINED[$i]}/generate.log" >&2; die "fairseq-generate failed for ${TRAINED[$i]}"; }
done
PIDS=()
for name in "${TRAINED[@]}"; do
    "$PY" scripts/score_bleu.py --name "$name" --generate-log "$OUT/$name/generate.out" \
        --reference "$DATA/text/test.$TGT" --hyp-out "$OUT/$name/test.hyp.$TGT" --json "$OUT/$name/bleu.json"
done

# ---- 6. report: loss plot, summary.json, example translations -----------------------------------
say "6/6 report"
"$PY" scripts/demo_report.py --out "$OUT" --models "${MODELS[@]}" --layers "$DEMO_LAYERS" \
    --corpus "$SRC->$TGT $(basename "${INPUT_FILES[0]}")" \
    --updates "$DEMO_UPDATES" --source "$DATA/text/test.$SRC" --reference "$DATA/text/test.$TGT" \
    --total-seconds "$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $START }")"

# ---- what to run next: translate a sentence of your own with the DeepNorm model -----------------
if [[ " ${TRAINED[*]} " == *" deepnorm "* ]]; then
    ABS_DATA=$(cd "$DATA" && pwd)
    ABS_OUT=$(cd "$OUT" && pwd)
    interactive=(
        "$(command -v fairseq-interactive)" "$ABS_DATA/bin" --user-dir "$REPO/deepnet_fairseq"
        --path "$ABS_OUT/deepnorm/checkpoints/checkpoint_last.pt" --source-lang "$SRC" --target-lang "$TGT"
        --bpe sentencepiece --sentencepiece-model "$ABS_DATA/spm/spm.model" --beam "$DEMO_BEAM" --cpu
    )
    printf -v line '%q ' "${interactive[@]}"
    example=$(head -n 1 "$DATA/text/test.$SRC")
    quote="'\\''"  # a single quote inside a single-quoted shell word
    echo
    echo "Translate a $SRC sentence of your own with the DeepNorm model (prints its $TGT translation;" \
        "drop the 2>/dev/null to see fairseq's log):"
    echo "echo '${example//\'/$quote}' | ${line% } 2>/dev/null | grep ^D- | cut -f3"
fi
