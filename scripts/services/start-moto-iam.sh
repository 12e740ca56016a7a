#!/usr/bin/env bash
# Start a second moto server in IAM-auth mode, with an HTTPS STS front, for testing how nagare signs AWS calls.
# Unlike start-moto.sh's server, this one checks every request's SigV4 signature against the keys it issued
# (a wrong key or secret is refused) and serves AssumeRoleWithWebIdentity, so web identity credentials
# (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE) can be tried end to end.
#   MOTO_IAM_PORT  moto's port on 127.0.0.1            (default 45661)
#   MOTO_STS_PORT  the HTTPS STS front's port           (default 45662)
#   MOTO_VENV, SVC_DIR as for start-moto.sh
# Sets up (with moto's first five unauthenticated calls) an IAM role nagare-reader and a user nagare-user, both
# allowed everything, and a key of the user. Writes $SVC_DIR/moto-iam.pid and $SVC_DIR/sts-front.pid; prints the
# AWS_* variables (the user's key), AWS_ROLE_ARN and AWS_ENDPOINT_URL_STS. The front's certificate is self-signed:
# clients set AWS_ALLOW_INVALID_CERTIFICATES=true for STS only.
set -euo pipefail
MOTO_IAM_PORT="${MOTO_IAM_PORT:-45661}"
MOTO_STS_PORT="${MOTO_STS_PORT:-45662}"
MOTO_VENV="${MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nagare-services/venv-moto}"
SVC_DIR="${SVC_DIR:-${TMPDIR:-/tmp}/nagare-services}"
DIR="$SVC_DIR/moto-iam"
PIDFILE="$SVC_DIR/moto-iam.pid"
FRONT_PIDFILE="$SVC_DIR/sts-front.pid"
URL="http://127.0.0.1:$MOTO_IAM_PORT"
HERE="$(cd "$(dirname "$0")" && pwd)"

# The venv (moto, boto3) is the one start-moto.sh installs.
MOTO_PORT=0 SVC_DIR="$SVC_DIR" MOTO_VENV="$MOTO_VENV" "$HERE/start-moto.sh" --install-only >/dev/null

mkdir -p "$DIR"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && [ -s "$DIR/keys.env" ]; then
  echo "moto (IAM auth) already running (pid $(cat "$PIDFILE"))" >&2
else
  [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")" 2>/dev/null || true
  rm -f "$DIR/keys.env"
  INITIAL_NO_AUTH_ACTION_COUNT=5 nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_IAM_PORT" \
    >"$DIR/moto.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 300); do
    curl -sf -o /dev/null "$URL/moto-api/data.json" && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DIR/moto.log" >&2; exit 1; }
    sleep 0.1
  done
  AWS_ENDPOINT_URL="$URL" "$MOTO_VENV/bin/python" - >"$DIR/keys.env" <<'PY'
import json, os
import boto3
kw = dict(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1",
          aws_access_key_id="AKIASETUP", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
everything = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Federated": "oidc"},
                                                              "Action": "sts:AssumeRoleWithWebIdentity"}]})
role = iam.create_role(RoleName="nagare-reader", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
iam.put_role_policy(RoleName="nagare-reader", PolicyName="everything", PolicyDocument=everything)
iam.create_user(UserName="nagare-user")
iam.put_user_policy(UserName="nagare-user", PolicyName="everything", PolicyDocument=everything)
key = iam.create_access_key(UserName="nagare-user")["AccessKey"]
print(f"AWS_ACCESS_KEY_ID={key['AccessKeyId']}")
print(f"AWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}")
print(f"AWS_ROLE_ARN={role}")
PY
fi

# The STS front signs what it forwards with the user's key (moto's auth mode wants every call signed).
. "$DIR/keys.env"
if ! { [ -f "$FRONT_PIDFILE" ] && kill -0 "$(cat "$FRONT_PIDFILE")" 2>/dev/null; }; then
  nohup "$MOTO_VENV/bin/python" "$HERE/sts-front.py" "$MOTO_STS_PORT" "$URL" "$DIR" \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$DIR/sts-front.log" 2>&1 </dev/null &
  echo $! >"$FRONT_PIDFILE"
  for _ in $(seq 100); do
    grep -q ready "$DIR/sts-front.log" 2>/dev/null && break
    kill -0 "$(cat "$FRONT_PIDFILE")" 2>/dev/null || { cat "$DIR/sts-front.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q ready "$DIR/sts-front.log" || { echo "STS front not ready" >&2; cat "$DIR/sts-front.log" >&2; exit 1; }
fi

echo "AWS_ENDPOINT_URL=$URL"
cat "$DIR/keys.env"
echo "AWS_REGION=us-east-1"
echo "AWS_ENDPOINT_URL_STS=https://127.0.0.1:$MOTO_STS_PORT"
echo "MOTO_PYTHON=$MOTO_VENV/bin/python"
echo "MOTO_IAM_PID=$(cat "$PIDFILE")  LOG=$DIR/moto.log  STS_FRONT_PID=$(cat "$FRONT_PIDFILE")"
