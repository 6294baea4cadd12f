#!/usr/bin/env bash
# End-to-end smoke test of the Docker deployment (docker-compose.yml + deploy/):
#
#   bash bench/compose_smoke.sh
#
#  1. makes sure a Docker engine answers (runs ../shared/tools/container-env.sh if it does not);
#  2. makes sure ./wheels holds the CPU torch wheel when the host can provide one
#     (pip download --no-deps -d wheels 'torch==2.13.0+cpu'), else the image installs torch
#     from TORCH_INDEX_URL; a wheel (or wheels/ folder) it downloads is removed on exit;
#  3. docker compose up -d --build --wait;
#  4. POSTs a rendered word image to /recognize and prints the JSON;
#  5. sends some traffic, then checks in Prometheus that the safl target is up, that the
#     rules loaded, and that the p99 latency query returns a value;
#  6. stops the service (SIGTERM: it must exit 0) and tears the stack down (also on failure).
#
# Prints one PASS/FAIL line per check; exit status 0 only when all passed.
# Knobs: SMOKE_PROJECT (compose project, default safl-smoke), SMOKE_KEEP=1 (leave it running),
#        SAFL_PORT_HOST / PROM_PORT_HOST only if you changed the published ports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROJECT=${SMOKE_PROJECT:-safl-smoke}
APP=http://127.0.0.1:${SAFL_PORT_HOST:-8000}
PROM=http://127.0.0.1:${PROM_PORT_HOST:-9090}
PY=${PYTHON:-python3}
export COMPOSE_PROJECT_NAME=$PROJECT
TMP=$(mktemp -d)
failures=0
started=0
WHEELS=$PWD/wheels
wheels_created=0       # 1: this run made wheels/ (removed on exit)
downloaded_wheel=""    # the torch wheel this run put into an existing wheels/ (removed on exit)

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
die()  { echo "FAIL: $*"; exit 1; }
step() { echo; echo "== $* ($(date +%T))"; }

cleanup() {
    status=$?
    if [ "$started" = 1 ]; then
        if [ "$failures" != 0 ] || [ "$status" != 0 ]; then
            echo; echo "== service logs (last 40 lines)"
            docker compose logs --no-color --tail 40 safl 2>&1 || true
        fi
        if [ "${SMOKE_KEEP:-0}" = 1 ]; then
            echo "SMOKE_KEEP=1: stack left running (docker compose -p $PROJECT down -v to remove)"
        else
            step "docker compose down"
            docker compose down -v --remove-orphans 2>&1 | tail -n 5 || true
        fi
    fi
    rm -rf "$TMP"
    if [ "$wheels_created" = 1 ]; then
        rm -rf "$WHEELS"
    elif [ -n "$downloaded_wheel" ]; then
        rm -f "$downloaded_wheel"
    fi
    echo
    if [ "$status" = 0 ] && [ "$failures" = 0 ]; then
        echo "SMOKE TEST: PASS"
    else
        echo "SMOKE TEST: FAIL ($failures failed check(s), exit $status)"
        [ "$status" = 0 ] && status=1
    fi
    exit "$status"
}
trap cleanup EXIT

# Small stdlib-only HTTP helpers (no curl/jq needed on the host).
cat > "$TMP/smoke_http.py" <<'PY'
import json, sys, time, urllib.error, urllib.parse, urllib.request, uuid

def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()

def post_files(url, paths, timeout=30):
    boundary = uuid.uuid4().hex
    body = b""
    for p in paths:
        data = open(p, "rb").read()
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{p.rsplit('/', 1)[-1]}\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

cmd = sys.argv[1]
if cmd == "wait200":                      # wait200 URL SECONDS
    url, deadline = sys.argv[2], time.time() + float(sys.argv[3])
    while True:
        status, body = get(url)
        if status == 200:
            print(body.decode(errors="replace")[:300]); sys.exit(0)
        if time.time() > deadline:
            print(f"last answer: {status} {body[:300]!r}"); sys.exit(1)
        time.sleep(1)
elif cmd == "recognize":                  # recognize URL FILE...
    status, body = post_files(sys.argv[2] + "/recognize", sys.argv[3:])
    print(f"HTTP {status}")
    try:
        print(json.dumps(json.loads(body), indent=2, ensure_ascii=False))
        doc = json.loads(body)
    except ValueError:
        print(body[:500]); sys.exit(1)
    ok = status == 200 and len(doc.get("results", [])) == len(sys.argv[3:]) and all("text" in r for r in doc["results"])
    sys.exit(0 if ok else 1)
elif cmd == "load":                       # load URL FILE SECONDS: sequential requests for SECONDS
    url, path, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
    n = ok = 0
    end = time.time() + seconds
    while time.time() < end:
        status, _ = post_files(url + "/recognize", [path] * (1 + n % 4))
        n += 1; ok += status == 200
        get(url + "/healthz")
        time.sleep(0.1)
    print(f"{ok}/{n} recognize requests answered 200")
    sys.exit(0 if n and ok == n else 1)
elif cmd == "target_up":                  # target_up PROM JOB SECONDS
    prom, job, deadline = sys.argv[2], sys.argv[3], time.time() + float(sys.argv[4])
    while True:
        status, body = get(prom + "/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        mine = [t for t in targets if t["labels"].get("job") == job]
        if mine and all(t["health"] == "up" for t in mine):
            for t in mine:
                print(f"{t['scrapeUrl']} health={t['health']} lastScrape={t['lastScrape']}")
            sys.exit(0)
        if time.time() > deadline:
            print(f"targets: {json.dumps(mine)[:600]}"); sys.exit(1)
        time.sleep(2)
elif cmd == "rules":                      # rules PROM: print the loaded rule groups
    status, body = get(prom := sys.argv[2] + "/api/v1/rules")
    groups = json.loads(body)["data"]["groups"] if status == 200 else []
    for g in groups:
        bad = [r["name"] for r in g["rules"] if r.get("health") not in ("ok", "unknown")]
        print(f"group {g['name']}: {len(g['rules'])} rules" + (f", unhealthy: {bad}" if bad else ""))
    sys.exit(0 if groups else 1)
elif cmd == "query":                      # query PROM EXPR SECONDS: wait for a finite value
    prom, expr, deadline = sys.argv[2], sys.argv[3], time.time() + float(sys.argv[4])
    while True:
        status, body = get(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        values = [r["value"][1] for r in result]
        if values and all(v not in ("NaN", "+Inf", "-Inf") for v in values):
            print(json.dumps(result)); sys.exit(0)
        if time.time() > deadline:
            print(f"last answer: {status} {body[:400]!r}"); sys.exit(1)
        time.sleep(3)
PY
http() { "$PY" "$TMP/smoke_http.py" "$@"; }

# ---------------------------------------------------------------------------------------
step "1. Docker engine"
if ! docker info >/dev/null 2>&1; then
    if [ -f ../shared/tools/container-env.sh ]; then
        echo "no Docker engine answers: running ../shared/tools/container-env.sh"
        bash ../shared/tools/container-env.sh 2>&1 | tail -n 6
        export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
    fi
fi
docker info >/dev/null 2>&1 && pass "docker engine reachable ($(docker version --format '{{.Server.Version}}'))" \
    || die "no Docker engine (start dockerd, or set DOCKER_HOST)"
docker compose version >/dev/null 2>&1 || die "the docker compose v2 plugin is missing"

# ---------------------------------------------------------------------------------------
step "2. torch wheel for the image"
if ls wheels/torch-*.whl >/dev/null 2>&1; then
    pass "wheels/ has $(basename "$(ls wheels/torch-*.whl | head -n 1)")"
else
    [ -d wheels ] || wheels_created=1
    if pip download --no-deps -q -d wheels 'torch==2.13.0+cpu' >/dev/null 2>&1 \
            && downloaded_wheel=$(ls "$WHEELS"/torch-*.whl 2>/dev/null | head -n 1) && [ -n "$downloaded_wheel" ]; then
        pass "downloaded $(basename "$downloaded_wheel") into wheels/ (removed on exit)"
    else
        echo "note: no local torch wheel; the image installs torch from TORCH_INDEX_URL"
    fi
fi
[ -f weights/safl.safetensors ] && [ -f weights/safl.json ] \
    && pass "weights/safl.safetensors (+ .json sidecar) present" \
    || die "weights/safl.safetensors or its .json sidecar is missing: the image bakes them in"

# ---------------------------------------------------------------------------------------
step "3. docker compose up -d --build --wait"
started=1
t0=$(date +%s)
if docker compose up -d --build --wait --wait-timeout 300 > "$TMP/up.log" 2>&1; then
    pass "stack built and healthy in $(( $(date +%s) - t0 )) s"
else
    tail -n 40 "$TMP/up.log"
    die "docker compose up failed"
fi
docker compose ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'
size=$(docker image inspect safl:latest --format '{{.Size}}' 2>/dev/null || echo 0)
echo "image safl:latest: $(( size / 1000000 )) MB; user: $(docker image inspect safl:latest --format '{{.Config.User}}')"
http wait200 "$APP/readyz" 120 >/dev/null && pass "/readyz is 200" || fail "/readyz did not turn 200 within 120 s"

# ---------------------------------------------------------------------------------------
step "4. recognize a word image"
# Rendered inside the container (Pillow is there), so the host needs no Python packages.
docker compose exec -T safl python -c "
import io, sys
from PIL import Image, ImageDraw, ImageFont
img = Image.new('RGB', (160, 48), 'white')
d = ImageDraw.Draw(img)
try:
    font = ImageFont.load_default(size=32)
except TypeError:
    font = ImageFont.load_default()
d.text((10, 6), 'HELLO', fill='black', font=font)
buf = io.BytesIO(); img.save(buf, 'PNG'); sys.stdout.buffer.write(buf.getvalue())
" > "$TMP/word.png"
[ -s "$TMP/word.png" ] || die "could not render the test image"
http recognize "$APP" "$TMP/word.png" && pass "POST /recognize answered 200 with one result" \
    || fail "POST /recognize"

# ---------------------------------------------------------------------------------------
step "5. Prometheus"
http target_up "$PROM" safl 60 && pass "Prometheus target safl:8000 is up" || fail "safl target not up in Prometheus"
http rules "$PROM" && pass "recording/alerting rules loaded" || fail "no rule groups loaded (deploy/rules.yml)"
# Traffic spread over several 5 s scrapes, so that rate() over 1 m sees it grow.
http load "$APP" "$TMP/word.png" 15 && pass "load: all requests answered" || fail "load: some requests failed"
q='histogram_quantile(0.99, sum(rate(safl_request_duration_seconds_bucket[1m])) by (le))'
echo "query: $q"
http query "$PROM" "$q" 60 && pass "p99 latency query returns a value" || fail "p99 latency query empty/NaN"
http query "$PROM" 'safl:recognize_duration_seconds:p99_1m' 45 && pass "recorded rule safl:recognize_duration_seconds:p99_1m has a value" \
    || fail "recorded p99 rule has no value"

# ---------------------------------------------------------------------------------------
step "6. graceful stop"
t0=$(date +%s)
docker compose stop safl >/dev/null 2>&1
code=$(docker inspect "$(docker compose ps -aq safl)" --format '{{.State.ExitCode}}' 2>/dev/null || echo "?")
[ "$code" = 0 ] && pass "SIGTERM: safl exited 0 after $(( $(date +%s) - t0 )) s" \
    || fail "SIGTERM: safl exit code $code (expected 0)"

[ "$failures" = 0 ]
