#!/bin/sh
# Install (or remove) Cairn's Jetson release: run from the unpacked tarball.
#   sudo ./install.sh                 binary, systemd unit, /etc/cairn/serve.env, user `cairn`
#   ./install.sh --root DIR           the same files under DIR (or DESTDIR=DIR), no user
#   sudo ./install.sh --uninstall     stop and remove the binary and the unit; keep
#                                     /etc/cairn, the models in /var/lib/cairn and the user
#   sudo ./install.sh --uninstall --purge   remove those too
# Running it again is harmless: files are replaced, an existing serve.env is kept.
set -eu

root=${DESTDIR:-/}
action=install
purge=0
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }; root=$2; shift ;;
        --root=*) root=${1#--root=} ;;
        --uninstall) action=uninstall ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ $purge = 0 ] || [ $action = uninstall ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$root"
root=$(cd "$root" && pwd)
# The live system (user, systemctl) only when installing into /.
live=0
[ "$root" = / ] && live=1
p() { if [ "$root" = / ]; then echo "$1"; else echo "$root$1"; fi; }

bin=$(p /usr/local/bin/cairn)
unit=$(p /etc/systemd/system/cairn-serve.service)
envf=$(p /etc/cairn/serve.env)
state=/var/lib/cairn
systemd_up() { [ $live = 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ $action = install ]; then
    [ $live = 0 ] || [ "$(id -u)" = 0 ] || { echo "install.sh: installing into / needs root (sudo)" >&2; exit 1; }
    for f in cairn cairn-serve.service serve.env; do
        [ -f "$here/$f" ] || { echo "install.sh: $here/$f is missing" >&2; exit 1; }
    done
    install -d -m 0755 "$(dirname "$bin")" "$(dirname "$unit")" "$(dirname "$envf")"
    # Through a temporary name: a running binary is replaced, not overwritten.
    install -m 0755 "$here/cairn" "$bin.new" && mv -f "$bin.new" "$bin"
    install -m 0644 "$here/cairn-serve.service" "$unit"
    if [ -e "$envf" ]; then
        echo "kept $envf"
    else
        install -m 0644 "$here/serve.env" "$envf"
    fi
    if [ $live = 1 ]; then
        if ! getent passwd cairn >/dev/null; then
            getent group cairn >/dev/null || groupadd --system cairn
            useradd --system --gid cairn --home-dir "$state" --no-create-home \
                --shell /usr/sbin/nologin --comment "Cairn LLM server" cairn
        fi
        # The GPU's device nodes on Jetson (/dev/nvhost-*, /dev/nvmap, /dev/dri) belong
        # to these groups.
        for g in video render; do
            if getent group "$g" >/dev/null && ! id -nG cairn | tr ' ' '\n' | grep -qx "$g"; then
                usermod -a -G "$g" cairn
            fi
        done
        install -d -m 0750 -o cairn -g cairn "$state"
        if systemd_up; then systemctl daemon-reload; fi
    fi
    echo "installed $bin, $unit, $envf"
    if [ $live = 1 ]; then
        echo "next: sudo -u cairn CAIRN_HOME=$state $bin pull; sudo systemctl enable --now cairn-serve"
    fi
else
    if systemd_up; then
        systemctl disable --now cairn-serve.service 2>/dev/null || true
    fi
    rm -f "$bin" "$bin.new" "$unit"
    if [ $purge = 1 ]; then
        rm -f "$envf"
        rmdir "$(dirname "$envf")" 2>/dev/null || true
        if [ $live = 1 ]; then
            rm -rf "$state"
            if getent passwd cairn >/dev/null; then userdel cairn; fi
            if getent group cairn >/dev/null; then groupdel cairn 2>/dev/null || true; fi
        fi
    elif [ -e "$envf" ]; then
        echo "kept $envf (--purge removes it$( [ $live = 1 ] && echo ", the models in $state and the user cairn"))"
    fi
    if systemd_up; then systemctl daemon-reload; fi
    echo "removed $bin and $unit"
fi
