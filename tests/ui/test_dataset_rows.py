"""GET /datasets/{id}/rows, the console's dataset preview: stored rows of a split, paged, tenant-checked."""

from __future__ import annotations

import httpx

from tests.support.stack import bearer
from tests.ui.conftest import ConsoleStack

ROWS = b"".join(b'{"prompt": "p%d", "completion": "c%d"}\n' % (i, i) for i in range(7))


def test_rows_of_each_split_paged_and_tenant_checked(console_stack: ConsoleStack) -> None:
    with httpx.Client(base_url=console_stack.url, headers=bearer(console_stack.key_a), timeout=30) as client:
        dataset = client.post("/datasets", files={"file": ("rows.jsonl", ROWS)}, data={"test_fraction": "0.3"}).json()
        train, test = dataset["splits"]["train"], dataset["splits"]["test"]
        assert train + test == 7 and test > 0
        first = client.get(f"/datasets/{dataset['id']}/rows", params={"limit": 3}).json()
        assert first["split"] == "train" and first["offset"] == 0 and len(first["data"]) == 3 and first["has_more"]
        rest = client.get(f"/datasets/{dataset['id']}/rows", params={"limit": 20, "offset": 3}).json()
        assert len(rest["data"]) == train - 3 and not rest["has_more"]
        seen = first["data"] + rest["data"]
        assert all("messages" in row for row in seen)  # stored normalized: prompt/completion became chat messages
        tests = client.get(f"/datasets/{dataset['id']}/rows", params={"split": "test", "limit": 20}).json()
        assert len(tests["data"]) == test
        assert not {str(r) for r in tests["data"]} & {str(r) for r in seen}
        for params, param in (({"split": "valid"}, "split"), ({"limit": 21}, "limit"), ({"offset": -1}, "offset")):
            refused = client.get(f"/datasets/{dataset['id']}/rows", params=params)
            assert refused.status_code == 422 and refused.json()["error"]["param"] == param, refused.text
        other = client.get(f"/datasets/{dataset['id']}/rows", headers=bearer(console_stack.key_b))
        assert other.status_code == 404 and other.json()["error"]["param"] == "dataset_id"
