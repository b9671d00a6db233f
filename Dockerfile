# Placeholder: the GPU image (CUDA PyTorch base, faiss-gpu, detectron2, mmsegmentation) is built
# in the pipeline issue. Until then this image runs the CPU stack with the same entrypoint.
FROM python:3.11-slim
WORKDIR /opt/sslbench
COPY . .
RUN PIP_FIND_LINKS= pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home sslbench
USER sslbench
ENTRYPOINT ["sslbench"]
