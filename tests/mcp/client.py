"""A real MCP client (the official Python SDK) against `openagi mcp`.

Run by node/tests/mcp.rs: client.py BINARY DATA_DIR PEER_ID [--allow-writes]
Starts the server over stdio, initialises, lists the tools, checks their
schemas, calls node_status (its peer id must be PEER_ID) and the write
tools, which must refuse without --allow-writes and, with it, reach the
daemon (whose own refusal must come back as a tool error). Prints one JSON
line of what it saw; exits non-zero on the first failure.
"""
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

READ_TOOLS = {
    "node_status", "peers", "ledger_head", "ledger_block", "transaction_status",
    "learning_jobs", "learning_job", "learning_models", "inbox", "outbox",
}
WRITE_TOOLS = {"submit_transaction", "submit_learning_job", "send_message"}


def text_of(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def main():
    binary, data_dir, peer_id = sys.argv[1:4]
    allow_writes = "--allow-writes" in sys.argv[4:]
    args = ["mcp", "--data-dir", data_dir] + (["--allow-writes"] if allow_writes else [])
    params = StdioServerParameters(command=binary, args=args)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.serverInfo.name == "openagi", init.serverInfo
            tools = {t.name: t for t in (await session.list_tools()).tools}
            missing = (READ_TOOLS | WRITE_TOOLS) - tools.keys()
            assert not missing, f"missing tools: {missing}"
            for name, tool in tools.items():
                assert len(tool.description or "") > 30, f"{name} has no real description"
            height = tools["ledger_block"].inputSchema["properties"]["height"]
            assert height["type"] == "integer", height
            assert "height" in tools["ledger_block"].inputSchema.get("required", [])

            status = await session.call_tool("node_status", {})
            assert not status.isError, text_of(status)
            doc = json.loads(text_of(status))
            assert doc["node"]["peer_id"] == peer_id, doc["node"]

            bad = await session.call_tool("transaction_status", {"hash": "zz"})
            assert bad.isError and "64 hexadecimal" in text_of(bad), text_of(bad)

            submitted = await session.call_tool("submit_transaction", {"payload": "from an agent"})
            if allow_writes:
                # This node runs no consensus: the daemon's own refusal
                # comes back as the tool error.
                assert submitted.isError, text_of(submitted)
                assert "--allow-writes" not in text_of(submitted), text_of(submitted)
            else:
                assert submitted.isError and "--allow-writes" in text_of(submitted), text_of(submitted)
            print(json.dumps({
                "tools": sorted(tools),
                "allow_writes": allow_writes,
                "submit_answer": text_of(submitted)[:200],
            }))


asyncio.run(main())
