"""knowlm_nb.serve: KnowLM's /generate schema over HTTP, refusals with reasons, queued requests."""
import json
import threading

import httpx
import pytest

from knowlm_nb import ROOT, serve

BASE = ROOT / "data_samples" / "tiny_base"
CAP = 24
GOOD = {"instruction": "List the names in the text.",
        "input": "Marta Velling joined the Harrowgate Institute.",
        "parameters": {"max_new_tokens": 6}}


@pytest.fixture(scope="module")
def server():
    with serve.start(BASE, template="alpaca_short", max_new_tokens_cap=CAP,
                     max_body_bytes=4096, max_batch=4) as s:
        with httpx.Client(base_url=s.url, timeout=300) as client:
            yield s, client


def test_binds_localhost_by_default():
    args = serve.build_parser().parse_args(["--model", "m", "--port", "8000"])
    assert args.host == "127.0.0.1" and not args.load_8bit and args.adapter is None
    args = serve.build_parser().parse_args(["--model", "m", "--port", "1", "--load-8bit",
                                            "--adapter", "a", "--host", "0.0.0.0"])
    assert args.load_8bit and args.adapter == "a" and args.host == "0.0.0.0"


def test_health_and_openapi(server):
    s, client = server
    assert s.url.startswith("http://127.0.0.1:")
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["max_new_tokens_cap"] == CAP
    schema = client.get("/openapi.json").json()
    assert "/generate" in schema["paths"]
    assert {"GenerateRequest", "GenerateResponse"} <= set(schema["components"]["schemas"])
    assert "instruction" in schema["components"]["schemas"]["GenerateRequest"]["required"]


def test_a_good_request_is_answered_in_knowlm_schema(server):
    _, client = server
    r = client.post("/generate", json=GOOD)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"generated_text", "num_output_tokens_cf", "error"}
    assert body["error"] is None and 1 <= body["num_output_tokens_cf"] <= 6
    again = client.post("/generate", json=GOOD).json()
    assert again == body                                        # ie preset: greedy, repeatable


def test_a_list_is_answered_as_a_batch_in_order(server):
    _, client = server
    one = client.post("/generate", json=GOOD).json()
    other = dict(GOOD, input="Residents of Pellworth were told to boil their water.")
    r = client.post("/generate", json=[GOOD, other, GOOD])
    assert r.status_code == 200
    answers = r.json()
    assert isinstance(answers, list) and len(answers) == 3
    assert answers[0] == answers[2] == one
    assert all(a["error"] is None for a in answers)


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (json.dumps({"input": "no instruction"}).encode(), 422, "missing 'instruction'"),
    (json.dumps({"instruction": ""}).encode(), 422, "non-empty string"),
    (json.dumps({"instruction": "x", "parameters": {"max_new_tokens": -3}}).encode(), 422, ">= 1"),
    (json.dumps({"instruction": "x", "parameters": {"max_new_tokens": 10**9}}).encode(), 422,
     "over this server's cap of 24"),
    (json.dumps({"instruction": "x", "parameters": {"colour": "red"}}).encode(), 422,
     "unknown generation parameter 'colour'"),
    (json.dumps({"instruction": "x", "parameters": {"temperature": 0.5}}).encode(), 422,
     "no effect without sampling"),
    (json.dumps({"instruction": "x", "parameters": {"top_p": 7}}).encode(), 422, "<= 1"),
    (json.dumps({"instruction": "x", "extra": 1}).encode(), 422, "unknown field"),
    (json.dumps([]).encode(), 422, "empty list"),
    (json.dumps([GOOD] * 5).encode(), 422, "over the cap of 4"),
    (json.dumps([GOOD, {"input": "x"}]).encode(), 422, "request 1: missing 'instruction'"),
    (json.dumps("just a string").encode(), 422, "JSON object"),
    (json.dumps({"instruction": "x" * 5000}).encode(), 413, "over the cap of 4096"),
])
def test_bad_requests_get_a_status_and_a_reason_and_the_server_goes_on(server, body, status, reason):
    _, client = server
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert reason in r.json()["error"]
    ok = client.post("/generate", json=dict(GOOD, parameters={"max_new_tokens": 2}))
    assert ok.status_code == 200 and ok.json()["error"] is None


def test_chat_preset_with_sampling_parameters_is_accepted(server):
    _, client = server
    r = client.post("/generate", json=dict(GOOD, parameters={
        "preset": "chat", "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 4, "seed": 3}))
    assert r.status_code == 200 and r.json()["error"] is None


def test_concurrent_requests_all_answered_never_interleaved(server):
    _, client = server
    results = [None] * 6
    params = {"max_new_tokens": 5}

    def call(i):
        with httpx.Client(base_url=client.base_url, timeout=300) as c:
            results[i] = c.post("/generate", json=dict(GOOD, parameters=params))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.status_code == 200 for r in results)
    assert len({json.dumps(r.json()) for r in results}) == 1     # same greedy answer for all
    health = client.get("/health").json()
    assert health["max_concurrent_generations"] == 1            # one generation at a time


def test_parse_item_unit():
    items, batch = serve.parse_body(json.dumps(GOOD).encode(), 32, 10_000, 4)
    assert not batch and items[0][0] == GOOD["instruction"] and items[0][2] == "ie"
    assert items[0][3]["max_new_tokens"] == 6
    default = serve.parse_item({"instruction": "x"}, cap=8)
    assert default[3]["max_new_tokens"] == 8                    # preset default capped
    with pytest.raises(serve.RequestError) as err:
        serve.parse_item({"instruction": "x", "parameters": {"preset": "wild"}}, cap=8)
    assert err.value.status == 422 and "unknown preset" in err.value.reason


def test_cli_refuses_a_bad_port_and_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        serve.main(["--model", str(BASE), "--port", "70000"])
    assert serve.main(["--model", str(tmp_path / "none"), "--port", "8123"]) == 2
    assert "not found" in capsys.readouterr().err
