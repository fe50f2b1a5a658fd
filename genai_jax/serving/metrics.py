"""The server's Prometheus metrics (`GET /metrics`, the text format of `prometheus-client`).

One registry per server, so that servers in one process (tests) count apart:
  genai_requests_total{route,status}          requests answered, by route and HTTP status
  genai_prompt_tokens_total                   tokens in (prompts, counted once per request)
  genai_generation_tokens_total               tokens out (every choice)
  genai_queue_wait_seconds                    histogram: arrival to prefill
  genai_time_to_first_token_seconds           histogram: arrival to the first generated token
  genai_request_duration_seconds{route}       histogram: arrival to the last byte
  genai_batch_occupancy                       histogram: busy decode slots / slots, per step
  genai_decode_slots_busy, genai_queue_depth  gauges, now
  genai_compile_events_total                  XLA compilations in this process (after warm-up
                                              this stays put: bucketed prompts, fixed slots)
  genai_ready                                 1 once warm-up compilation is done
"""

from __future__ import annotations

import threading

import jax
import prometheus_client as prom

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's name
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OCCUPANCY_BUCKETS = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

_compile_lock = threading.Lock()
_compile_counters: list[prom.Counter] = []


def _on_event(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT:
        with _compile_lock:
            for counter in _compile_counters:
                counter.inc()


jax.monitoring.register_event_duration_secs_listener(_on_event)


class Metrics:
    def __init__(self):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("genai_requests", "Requests answered, by route and HTTP "
                                     "status", ["route", "status"], registry=r)
        self.prompt_tokens = prom.Counter("genai_prompt_tokens", "Prompt tokens received",
                                          registry=r)
        self.generation_tokens = prom.Counter("genai_generation_tokens", "Tokens generated",
                                              registry=r)
        self.queue_wait = prom.Histogram("genai_queue_wait_seconds", "Arrival to prefill",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = prom.Histogram("genai_time_to_first_token_seconds",
                                   "Arrival to the first generated token",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = prom.Histogram("genai_request_duration_seconds", "Arrival to answer",
                                       ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.occupancy = prom.Histogram("genai_batch_occupancy", "Busy decode slots / slots, "
                                        "per decode step", buckets=_OCCUPANCY_BUCKETS,
                                        registry=r)
        self.slots_busy = prom.Gauge("genai_decode_slots_busy", "Busy decode slots", registry=r)
        self.queue_depth = prom.Gauge("genai_queue_depth", "Sequences waiting for a slot",
                                      registry=r)
        self.compile_events = prom.Counter("genai_compile_events", "XLA compilations in this "
                                           "process", registry=r)
        self.ready = prom.Gauge("genai_ready", "1 once warm-up compilation is done", registry=r)
        with _compile_lock:
            _compile_counters.append(self.compile_events)

    def close(self) -> None:
        with _compile_lock:
            if self.compile_events in _compile_counters:
                _compile_counters.remove(self.compile_events)

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)

    content_type = prom.CONTENT_TYPE_LATEST
