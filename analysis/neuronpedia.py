"""Labels from the explanations Neuronpedia publishes for our GPT-2 small dictionaries (on request, online).

1. Map each dictionary to its Neuronpedia source: model ``gpt2-small``; ``attn{L}`` (Kissane et al.'s attention
   SAEs) is ``{L}-att-kk``, ``mlp{L}`` (Dunefsky et al.'s transcoders) is ``{L}-tres-dc``.
2. Ask ``/api/feature/{model}/{source}/{index}`` for each feature (a few requests at a time).
3. Take the first non-blank explanation ``description`` of each answer; a feature without a page (HTTP 404)
   or without an explanation gets no label here (its automatic label, ``analysis/cards.py``, stays).

Nothing here runs unless asked for; without the network it raises ``ConnectionError`` with one clear line.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

from analysis.cards import feature_key

# Neuronpedia's sources for our GPT-2 small dictionaries: the Kissane et al. attention SAEs (sae-lens release
# gpt2-small-hook-z-kk lists them as gpt2-small/{L}-att-kk) and the Dunefsky et al. transcoders (tres-dc).
NEURONPEDIA_MODEL = {"gpt2-small": "gpt2-small"}
NEURONPEDIA_SOURCE = {"attn": "{layer}-att-kk", "mlp": "{layer}-tres-dc"}
NEURONPEDIA_API = "https://www.neuronpedia.org/api/feature/{model}/{source}/{index}"


def neuronpedia_source(dictionary: str) -> str:
    prefix = dictionary.rstrip("0123456789")
    layer = dictionary[len(prefix):]
    if prefix not in NEURONPEDIA_SOURCE or not layer:
        raise ValueError(f"dictionary {dictionary!r} has no Neuronpedia source; expected attn{{L}} or mlp{{L}}")
    return NEURONPEDIA_SOURCE[prefix].format(layer=int(layer))


def parse_neuronpedia_feature(payload: Mapping[str, Any]) -> str | None:
    """The explanation of one feature from Neuronpedia's ``/api/feature`` answer (its first explanation's
    ``description``), or None when it has none."""
    for expl in payload.get("explanations") or []:
        text = (expl or {}).get("description")
        if isinstance(text, str) and text.strip():
            return " ".join(text.split())
    return None


def _fetch_json(url: str, timeout: float) -> dict[str, Any] | None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "circuits-toolkit", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def neuronpedia_labels(suite_name: str, features: Iterable[tuple[str, int]], timeout: float = 10.0,
                       fetch: Callable[[str, float], dict[str, Any] | None] | None = None,
                       workers: int = 8) -> dict[str, str]:
    """Labels from the explanations Neuronpedia publishes for our GPT-2 small dictionaries, keyed like cards.

    Neuronpedia covers, for model ``gpt2-small``: the attention SAEs ``attn{L}`` as sources ``{L}-att-kk``
    (Kissane et al., the ids sae-lens's release ``gpt2-small-hook-z-kk`` records) and the MLP transcoders
    ``mlp{L}`` as ``{L}-tres-dc`` (Dunefsky et al.'s transcoders, published as the ``pchlenski/gpt2-transcoders``
    weights this project loads; ARENA's transcoder exercises compare layer 8 against ``gpt2-small/8-tres-dc``,
    and the other layers follow the same naming). Which features carry explanations is Neuronpedia's to say: a
    feature without a page (HTTP 404) or without an explanation is left out, and its automatic label stays. The
    embedded ``mini`` suite has none. This is the only network use of the module: it runs only when asked, and
    raises ``ConnectionError`` with one clear line when neuronpedia.org cannot be reached."""
    import urllib.error
    from concurrent.futures import ThreadPoolExecutor

    if suite_name not in NEURONPEDIA_MODEL:
        raise ValueError(f"Neuronpedia publishes no explanations for suite {suite_name!r}; it covers "
                         f"{', '.join(NEURONPEDIA_MODEL)} (attention SAEs *-att-kk, transcoders *-tres-dc)")
    fetch = fetch or _fetch_json
    pairs = list(dict.fromkeys((str(d), int(f)) for d, f in features))
    urls = {feature_key(d, f): NEURONPEDIA_API.format(model=NEURONPEDIA_MODEL[suite_name], source=neuronpedia_source(d), index=f)
            for d, f in pairs}

    def one(item: tuple[str, str]) -> tuple[str, str | None]:
        key, url = item
        payload = fetch(url, timeout)
        return key, parse_neuronpedia_feature(payload) if payload else None

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = list(pool.map(one, urls.items()))
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"could not reach neuronpedia.org ({e}); labels from Neuronpedia need the network; "
                              f"run without --labels neuronpedia for automatic labels") from e
    return {k: v for k, v in found if v}
