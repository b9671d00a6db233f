# sslbench on GPUs: PyTorch 2.13.0 with CUDA 13.0 (the torch constraints.txt pins; PyPI's build
# of it is cu130 too), the project with every extra, and the backends compiled for that CUDA:
# detectron2 (detection, MoCo protocol) from source, mmcv 2.1.0 with its CUDA ops for
# mmsegmentation 1.2.2, and faiss on GPU. The entrypoint is the same `sslbench` CLI:
#   docker build -t sslbench .
#   docker run --gpus all --shm-size 16g -v /path/to/datasets:/data:ro -v "$PWD/results":/results \
#       sslbench run configs/pipeline/imagenet_r50.yaml
# Datasets are read from /data (read-only) and everything is written under /results
# (configs/pipeline/imagenet_r50.yaml lists the layout).
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel

# GPUs the compiled ops run on (CUDA 13 supports Turing and later): A100, A10/3090, L40/4090,
# H100, B200, RTX 50 + PTX for newer ones.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# detectron2 publishes no wheels for current torch; this commit is built from source.
ARG DETECTRON2_COMMIT=2dde706855d87baa9760fbcd0bdb6004a3937204

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FORCE_CUDA=1 \
    MMCV_WITH_OPS=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    SSLBENCH_DATA=/data

# git: detectron2's source; libgl1/libglib2.0-0: OpenCV (mmcv); the base image's apt sources
# change under a fixed tag, so these are not version-pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential git ninja-build libgl1 \
       libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sslbench
COPY pyproject.toml constraints.txt README.md ./
COPY sslbench sslbench
COPY pretrain pretrain
COPY evaluators evaluators
COPY transfer transfer
COPY configs configs

# mmcv has no wheel for this torch: it compiles against the installed torch (no build isolation),
# and its setup.py needs setuptools < 81. It goes first so that the project's `segmentation`
# extra finds it installed. faiss-cpu (a core dependency) is swapped for faiss-gpu at the same
# version: both provide the `faiss` module, so the CPU one is removed first. PyPI's faiss-gpu
# 1.15.1 is built for CUDA 12 and brings its runtime as nvidia-*-cu12 wheels (there is no CUDA 13
# faiss wheel); the CUDA 13 driver this image needs runs CUDA 12 code too.
RUN pip install -c constraints.txt "setuptools<81" wheel \
    && pip install --no-build-isolation -c constraints.txt mmcv==2.1.0 \
    && pip install -c constraints.txt ".[segmentation]" \
    && pip install --no-build-isolation \
       "git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}" \
    && pip uninstall -y faiss-cpu \
    && pip install -c constraints.txt faiss-gpu \
    && python -c "import detectron2, mmcv, mmseg, faiss, sslbench"

# A non-root user (uid 1000, numeric so the host resolves it); runs are written under /results
# (mount a volume there that uid 1000 may write, or pass --user). /data and runs/ are writable
# too, so the synthetic pipelines (configs/pipeline/default.yaml, quick.yaml) run with no mounts.
RUN useradd --create-home --uid 1000 sslbench \
    && mkdir -p /data /results /opt/sslbench/runs \
    && chown 1000:1000 /data /results /opt/sslbench/runs
USER 1000:1000
ENV SSLBENCH_CACHE=/results/.feature_cache
ENTRYPOINT ["sslbench"]
CMD ["--help"]
