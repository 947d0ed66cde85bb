#!/bin/bash
# Build MedCap's images with podman on a machine that reaches the Debian and PyPI package
# registries but no image registry (this project's development and CI machines):
#
#   docker/local-images.sh [IMAGE...]        (from anywhere; default: all of them, in this order)
#
#   base        localhost/medcap-base:bookworm      mmdebstrap minbase bookworm + python3, venv, CA
#                                                   certificates (skipped when present; REBUILD_BASE=1)
#   postgres    localhost/medcap-postgres:15        docker/local/postgres.Containerfile  } stand-ins for the
#   redis       localhost/medcap-redis:7            docker/local/redis.Containerfile     } official images,
#   orthanc     localhost/medcap-orthanc:latest     docker/local/orthanc.Containerfile   } from Debian packages
#   medcap      localhost/medcap:latest             docker/Dockerfile on the local base
#   worker-cpu  localhost/medcap-worker-cpu:latest  docker/Dockerfile.worker on the local base, CPU torch
#
# Images are in Docker's format, which keeps HEALTHCHECK (OCI's has none). Then run the stack with
# docker/compose.local.yaml (it names these images). Each build prints its time; the sizes come at
# the end. pip inside a build uses this machine's pip configuration (its
# config files and the certificate, constraints and local package directories they name),
# bind-mounted read-only for the RUN steps only: nothing of it is copied into an image.
#
# Needs root and: apt-get install podman buildah runc mmdebstrap uidmap. podman runs with
# docker/podman/containers.conf (runc, cgroupfs, no default ulimits) unless CONTAINERS_CONF is set.
set -euo pipefail

DOCKER=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$DOCKER")
export CONTAINERS_CONF=${CONTAINERS_CONF:-$DOCKER/podman/containers.conf}
BASE=localhost/medcap-base:bookworm

# -v options for the machine's pip configuration: config files and directories, and every existing
# absolute path they name (certificate, constraints, find-links, file:// indexes), read-only.
pip_mounts() {
    local -A seen=()
    local configs=(/etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip" "$HOME/.pip.conf")
    local path target
    for path in "${configs[@]}"; do
        [ -e "$path" ] || continue
        target=${path/#$HOME//root}  # the build's RUN steps run as root
        seen[$path]=1
        echo "-v=$path:$target:ro"
        while read -r named; do
            named=${named#file://}
            named=${named%/simple}
            [ -e "$named" ] && [ -z "${seen[$named]:-}" ] || continue
            seen[$named]=1
            echo "-v=$named:$named:ro"
        done < <(grep -rhoE '(file://)?/[^ ,"'"'"']+' "$path" 2>/dev/null | grep -v '^#' || true)
    done
}

# Where the CPU worker gets torch: PyTorch's CPU index; or, where pip's configuration already has a
# local CPU wheel of pyproject's pin in a find-links directory (as here), PyPI, so that pip takes
# that wheel (2.13.0+cpu sorts above PyPI's 2.13.0) and looks up nothing at an index it cannot reach.
torch_index() {
    local pin version mount dir
    pin=$(cd "$REPO" && python3 docker/requirements.py --no-base --extra model=torch)
    version=${pin#torch==}
    while read -r mount; do
        dir=${mount#-v=}
        dir=${dir%%:*}
        if compgen -G "$dir/torch-$version+cpu-*.whl" > /dev/null; then
            echo "https://pypi.org/simple"
            return
        fi
    done < <(pip_mounts)
    echo "https://download.pytorch.org/whl/cpu"
}

timed() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*" | cut -c1-200
    nice -n 10 "$@"
    echo "== $name built in $((SECONDS - start)) s"
}

build_base() {
    if [ -z "${REBUILD_BASE:-}" ] && podman image exists "$BASE"; then
        echo "== base: $BASE is there (REBUILD_BASE=1 to rebuild it)"
        return
    fi
    local tar
    tar=$(mktemp --suffix=.tar)
    trap 'rm -f "$tar"' RETURN
    timed base mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd bookworm "$tar"
    podman import --change 'CMD ["/bin/bash"]' "$tar" "$BASE"
}

build_service() {  # name tag
    timed "$1" podman build --quiet --format docker --build-arg BASE_IMAGE="$BASE" -f "$DOCKER/local/$1.Containerfile" -t "$2" "$DOCKER/local"
}

build_medcap() {  # name dockerfile tag build-args...
    local name=$1 dockerfile=$2 tag=$3
    shift 3
    mapfile -t mounts < <(pip_mounts)
    timed "$name" podman build --quiet --format docker "${mounts[@]}" "$@" \
        -f "$DOCKER/$dockerfile" --ignorefile "$DOCKER/$dockerfile.dockerignore" -t "$tag" "$REPO"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(base postgres redis orthanc medcap worker-cpu)
built=()
for target in "${targets[@]}"; do
    case $target in
        base) build_base; built+=("$BASE") ;;
        postgres) build_service postgres localhost/medcap-postgres:15; built+=(localhost/medcap-postgres:15) ;;
        redis) build_service redis localhost/medcap-redis:7; built+=(localhost/medcap-redis:7) ;;
        orthanc) build_service orthanc localhost/medcap-orthanc:latest; built+=(localhost/medcap-orthanc:latest) ;;
        medcap)
            build_medcap medcap Dockerfile localhost/medcap:latest --build-arg BASE_IMAGE="$BASE"
            built+=(localhost/medcap:latest)
            ;;
        worker-cpu)
            build_medcap worker-cpu Dockerfile.worker localhost/medcap-worker-cpu:latest --build-arg CUDA_IMAGE="$BASE" \
                --build-arg TORCH_INDEX_URL="$(torch_index)" --build-arg TORCH_BUILD=cpu
            built+=(localhost/medcap-worker-cpu:latest)
            ;;
        *)
            echo "local-images.sh: unknown image $target (base, postgres, redis, orthanc, medcap, worker-cpu)" >&2
            exit 2
            ;;
    esac
done
echo "== sizes"
for image in "${built[@]}"; do
    podman image inspect --format "{{.Size}} $image" "$image" | awk '{printf "%8.0f MB  %s\n", $1 / 1e6, $2}'
done
