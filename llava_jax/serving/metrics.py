"""Server counters and the Prometheus text exposition of `/metrics` (no client library needed)."""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "llava_jax_"


class Metrics:
    def __init__(self, n_slots: int):
        self.lock = threading.Lock()
        self.n_slots = n_slots
        self.requests = {}  # (endpoint, outcome) -> count
        self.prompt_tokens = self.generated_tokens = 0
        self.running = self.waiting = self.slots_busy = self.slots_busy_max = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def count_request(self, endpoint: str, outcome: str) -> None:
        with self.lock:
            self.requests[endpoint, outcome] = self.requests.get((endpoint, outcome), 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds

    def set_load(self, running: int, waiting: int) -> None:
        with self.lock:
            self.running, self.waiting, self.slots_busy = running, waiting, running
            self.slots_busy_max = max(self.slots_busy_max, running)

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self, image_cache=None) -> str:
        p = PREFIX
        with self.lock:
            lines = [f"# HELP {p}requests_total Finished requests by endpoint and outcome.", f"# TYPE {p}requests_total counter"]
            lines += [f'{p}requests_total{{endpoint="{e}",outcome="{o}"}} {n}' for (e, o), n in sorted(self.requests.items())]
            for name, kind, value, text in (
                ("prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens processed (image tokens included)."),
                ("generation_tokens_total", "counter", self.generated_tokens, "Tokens generated."),
                ("requests_running", "gauge", self.running, "Requests in a slot now."),
                ("requests_waiting", "gauge", self.waiting, "Requests waiting for a slot."),
                ("slots_busy", "gauge", self.slots_busy, "Slots busy now."),
                ("slots_busy_max", "gauge", self.slots_busy_max, "Most slots busy at once since the start."),
                ("slots_total", "gauge", self.n_slots, "Slots (-np)."),
            ):
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
            lines += [f"# HELP {p}time_to_first_token_seconds Seconds from arrival to the first token.",
                      f"# TYPE {p}time_to_first_token_seconds histogram"]
            total = 0
            for b, n in zip(TTFT_BUCKETS, self.ttft_counts, strict=False):
                total += n
                lines.append(f'{p}time_to_first_token_seconds_bucket{{le="{b}"}} {total}')
            total += self.ttft_counts[-1]
            lines += [f'{p}time_to_first_token_seconds_bucket{{le="+Inf"}} {total}',
                      f"{p}time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"{p}time_to_first_token_seconds_count {total}"]
        if image_cache is not None:
            for name, kind, value, text in (
                ("image_cache_hits_total", "counter", image_cache.hits, "Images found in the embedding cache."),
                ("image_cache_misses_total", "counter", image_cache.misses, "Images not in the embedding cache."),
                ("image_encodes_total", "counter", image_cache.encodes, "Images run through the vision tower."),
                ("image_cache_bytes", "gauge", image_cache.bytes, "Bytes of embeddings held."),
                ("image_cache_entries", "gauge", len(image_cache), "Images held."),
            ):
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
        return "\n".join(lines) + "\n"
