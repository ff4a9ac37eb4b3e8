#!/bin/sh
# Install the CT screening appliance from this bundle, with no network at all.
#
#   sh install.sh --prefix DIR [--data DIR] [--user NAME] [--trust VENDOR.pub] [--python python3]
#
# 1. every file is checked against SHA256SUMS (sha256sum; nothing is run before that), no file added, no link;
# 2. python3 -m venv (the bundled .deb files give it to a minimal Debian 12 when run as root);
# 3. DIR/versions/<version>/venv gets every wheel from wheelhouse/ by hash (pip --no-index --require-hashes);
# 4. the vendor's Ed25519 signature over the whole bundle is checked by the installed appliance itself
#    (a failure removes the new version); the model packs, units and vendor key are copied beside the venv;
# 5. DIR/current -> versions/<version>, DIR/bin/appliance -> ../current/venv/bin/appliance;
# 6. as root: the service user and the data directory (default /var/lib/appliance) owned by it.
# Running it again with the same version changes nothing. --no-switch (used by `appliance update`) stops
# after step 4 and leaves DIR/current as it is.
set -eu

PREFIX=/opt/appliance
DATA=
SERVICE_USER=appliance
TRUST=
PYTHON=python3
SWITCH=1

die() {
    echo "install.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX=$2; shift 2 ;;
        --data) [ $# -ge 2 ] || die "--data needs a folder"; DATA=$2; shift 2 ;;
        --user) [ $# -ge 2 ] || die "--user needs a name"; SERVICE_USER=$2; shift 2 ;;
        --trust) [ $# -ge 2 ] || die "--trust needs a key file"; TRUST=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs a command"; PYTHON=$2; shift 2 ;;
        --no-switch) SWITCH=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
if [ -n "$DATA" ]; then
    case "$DATA" in /*) ;; *) DATA=$(pwd)/$DATA ;; esac
fi
case "$PREFIX$DATA" in *\"*|*\\*) die "BAD_PATH: the prefix and data folder may not contain \" or \\" ;; esac
if [ -n "$TRUST" ]; then
    case "$TRUST" in /*) ;; *) TRUST=$(pwd)/$TRUST ;; esac
fi
IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1

field() {  # a string field of BUNDLE.json
    sed -n "s/^ *\"$1\": \"\\([^\"]*\\)\",\\{0,1\\}\$/\\1/p" "$HERE/BUNDLE.json"
}

# 1. the files are the ones listed, nothing added, nothing linked
cd "$HERE"
{ [ -f SHA256SUMS ] && [ -f BUNDLE.json ]; } || die "NOT_A_BUNDLE: $HERE has no SHA256SUMS or BUNDLE.json"
sha256sum --check --strict --quiet SHA256SUMS >/dev/null 2>&1 \
    || die "FILE_CHANGED: a file of the bundle is damaged or changed ($(sha256sum --check --quiet SHA256SUMS 2>&1 | head -1)); copy the bundle again"
odd=$(find . ! -type f ! -type d | head -1)
[ -z "$odd" ] || die "NOT_REGULAR_FILE: $odd is a link or special file; the bundle is not the one the vendor built"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
find . -type f ! -path ./SHA256SUMS ! -path ./SIGNATURE.json | sort >"$scratch/present"
sed 's/^[0-9a-f]*  //' SHA256SUMS | sort >"$scratch/listed"
extra=$(comm -23 "$scratch/present" "$scratch/listed" | head -1)
[ -z "$extra" ] || die "EXTRA_FILE: $extra is not listed in SHA256SUMS; the bundle is not the one the vendor built"
VERSION=$(field version)
MACHINE=$(field machine)
PY_VERSION=$(field python_version)
{ [ -n "$VERSION" ] && [ -n "$MACHINE" ]; } || die "NOT_A_BUNDLE: BUNDLE.json names no version or machine"
[ "$(uname -m)" = "$MACHINE" ] || die "WRONG_PLATFORM: this bundle is for $MACHINE, this machine is $(uname -m)"
echo "bundle appliance $VERSION for $MACHINE: every file matches SHA256SUMS"

# 2. Python and its venv module (python3-venv), from the bundled .deb files when missing
command -v "$PYTHON" >/dev/null 2>&1 || die "NO_PYTHON: $PYTHON is not installed (the appliance needs Python $PY_VERSION)"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "$PY_VERSION" ] || die "WRONG_PYTHON: $PYTHON is Python $have; this bundle's wheels are for Python $PY_VERSION"
if [ "$IS_ROOT" = 1 ] && [ -d debs ]; then
    for deb in debs/*.deb; do
        package=$(basename "$deb" | sed 's/_.*//')
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" && continue
        echo "installing $package from the bundle (dpkg -i)"
        missing_debs="${missing_debs:-} $deb"
    done
    if [ -n "${missing_debs:-}" ]; then
        # shellcheck disable=SC2086  # one word per .deb file, none with a space
        dpkg -i $missing_debs >/dev/null || die "DPKG_FAILED: dpkg -i$missing_debs failed"
    fi
fi
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "NO_VENV: $PYTHON has no venv module; as root this script installs it from debs/ (Debian 12), on a Jetson: apt-get install python3-venv (JETSON.md)"

# 3. the version's venv, every wheel by hash, no index
TARGET=$PREFIX/versions/$VERSION
if [ -f "$TARGET/.installed" ]; then
    echo "appliance $VERSION is already installed in $TARGET"
else
    rm -rf "$TARGET"  # what an interrupted run left
    mkdir -p "$TARGET"
    echo "creating $TARGET/venv and installing $(grep -c . requirements.txt) wheels by hash, with no index"
    venv_options=
    [ "$MACHINE" = aarch64 ] && venv_options=--system-site-packages  # JetPack's TensorRT and pycuda (JETSON.md)
    # shellcheck disable=SC2086  # empty or one option
    "$PYTHON" -m venv $venv_options "$TARGET/venv" || { rm -rf "$TARGET"; die "VENV_FAILED: $PYTHON -m venv $TARGET/venv failed"; }
    PIP_CONFIG_FILE=/dev/null PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$TARGET/venv/bin/python" -m pip install --quiet --no-index --find-links "$HERE/wheelhouse" \
        --only-binary=:all: --ignore-installed --require-hashes -r "$HERE/requirements.txt" \
        || { rm -rf "$TARGET"; die "PIP_FAILED: the wheelhouse did not install (see above); nothing was switched"; }

    # 4. the vendor's signature over every file, checked by the appliance just installed
    key=${TRUST:-$HERE/vendor.pub}
    "$TARGET/venv/bin/python" -I -m appliance.release verify "$HERE" --trust "$key" \
        || { rm -rf "$TARGET"; die "the bundle's signature does not hold; $TARGET removed, nothing switched"; }
    cp -R "$HERE/engines" "$HERE/systemd" "$TARGET/"
    cp "$HERE/vendor.pub" "$HERE/BUNDLE.json" "$TARGET/"
    [ -f "$HERE/JETSON.md" ] && cp "$HERE/JETSON.md" "$TARGET/"
    if [ "$IS_ROOT" = 1 ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        chown -R "$SERVICE_USER:" "$TARGET/engines"  # the box builds its INT8 models there
    fi
    : >"$TARGET/.installed"
    echo "installed appliance $VERSION in $TARGET"
fi
[ "$SWITCH" = 1 ] || exit 0

# 5. switch: current -> this version, bin/appliance -> current's
previous=
[ -L "$PREFIX/current" ] && previous=$(basename "$(readlink "$PREFIX/current")")
if [ "$previous" = "$VERSION" ] && [ -L "$PREFIX/bin/appliance" ]; then
    echo "appliance $VERSION is already the current version in $PREFIX: nothing to do"
else
    ln -sfn "versions/$VERSION" "$PREFIX/current.new"
    mv -T "$PREFIX/current.new" "$PREFIX/current"
    mkdir -p "$PREFIX/bin"
    ln -sfn ../current/venv/bin/appliance "$PREFIX/bin/appliance"
    echo "$PREFIX/current -> versions/$VERSION"
fi

# 6. as root: the service user owns the data directory and the packs (the box builds its INT8 models there)
if [ "$IS_ROOT" = 1 ]; then
    DATA=${DATA:-/var/lib/appliance}
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER" \
            || die "USER_FAILED: useradd $SERVICE_USER failed"
        echo "created the system user $SERVICE_USER"
    fi
    mkdir -p "$DATA"
    chown "$SERVICE_USER:" "$DATA"
    chmod 750 "$DATA"
    chown -R "$SERVICE_USER:" "$TARGET/engines"
fi
if [ ! -f "$PREFIX/state.json" ]; then
    printf '{\n "current": "%s",\n "previous": null,\n "data": "%s",\n "backup": null\n}\n' \
        "$VERSION" "${DATA:-}" >"$PREFIX/state.json.new"
    mv "$PREFIX/state.json.new" "$PREFIX/state.json"
fi

DATA_SHOWN=${DATA:-/var/lib/appliance}
cat <<NEXT

Next steps (as root):
  $PREFIX/bin/appliance install-systemd --install --user $SERVICE_USER --home $DATA_SHOWN --venv $PREFIX/current/venv
  systemctl enable --now appliance-build-engines.service appliance-dicom.service appliance-export.timer \\
      appliance-web.service appliance-worker.service
  sudo -u $SERVICE_USER APPLIANCE_HOME=$DATA_SHOWN $PREFIX/bin/appliance users add admin --role admin
Later versions: $PREFIX/bin/appliance update /media/usb/appliance-<version>-linux-$MACHINE.tar.gz
NEXT
