# tunevec on a CUDA host: vLLM's official OpenAI image already carries CUDA, torch and vLLM.
#   docker build -t tunevec .
#   docker run --gpus all -p 8000:8000 -v /models/base:/models/base:ro -v /vectors:/vectors tunevec \
#       --base /models/base --vectors /vectors [--tensor-parallel-size 2]
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/tunevec
COPY pyproject.toml README.md ./
COPY tunevec ./tunevec
COPY analysis ./analysis
COPY steering ./steering
COPY server ./server
COPY eval ./eval
# vLLM and torch come from the image; install tunevec and its light dependencies only.
RUN pip install --no-cache-dir lm-eval==0.4.13 matplotlib \
 && pip install --no-cache-dir --no-deps -e .

ENV HF_HUB_OFFLINE=1
EXPOSE 8000
# The vectors folder must be writable: each vector's low-rank factors are cached in DIR/.tunevec-cache (built once
# per vector and settings; nothing is written per mixture).
ENTRYPOINT ["tunevec", "serve", "--host", "0.0.0.0", "--port", "8000"]
