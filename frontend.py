"""The streamlit demo of a running policy server: ``streamlit run frontend.py``.

Only the page's layout lives here; it talks to the server over HTTP through
``policy_server.frontend`` (client, forms, charts) and starts the bundled example server with
``policy_server.frontend.example``. Settings: ``POLICY_SERVER_URL`` and ``POLICY_SERVER_API_KEY``;
without the key, a server on this machine gets the local schema's (``SCHEMA_PATH`` or ./schema.yaml).
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any

import streamlit as st

from policy_server.frontend import charts, forms
from policy_server.frontend.example import ExampleServer, demo_api_key, start_example
from policy_server.frontend.gateway_api import DemoClient, DemoError, ServerError, policy_path

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_S = 2.0
GRID_COLUMNS = 4


@st.cache_resource
def example_servers() -> dict[str, ExampleServer]:
    """The example server this streamlit process started (one at most), stopped at exit."""
    servers: dict[str, ExampleServer] = {}
    atexit.register(lambda: [s.stop() for s in servers.values()])
    return servers


def show_error(exc: Exception) -> None:
    if isinstance(exc, ServerError):
        st.error(f"**{exc.status} {exc.code}**: {exc.message}")
        if exc.fields:
            st.dataframe(exc.fields, hide_index=True)
    else:
        st.error(str(exc))


def sidebar() -> tuple[str, str, bool]:
    """Server URL, api key, and whether a server answers there; starts the example on request."""
    state = st.session_state
    state.setdefault("server_url", os.environ.get("POLICY_SERVER_URL", DEFAULT_URL))
    state.setdefault("api_key", demo_api_key(state.server_url))
    if started := state.pop("started_server", None):  # set before the widgets exist
        state.server_url, state.api_key = started
    bar = st.sidebar
    bar.title("policy-server")
    url = bar.text_input("Server URL", key="server_url", help="With the schema's url_path, if it has one.")
    key = bar.text_input("API key", key="api_key", type="password",
                         help="Sent as the `access-token` header. At first: POLICY_SERVER_API_KEY, or for a server "
                         "on this machine the local schema's `parameters.api_key`.")
    with DemoClient(url, key) as client:
        alive = client.alive()
    if alive:
        bar.success(f"A server answers at {url}")
    else:
        bar.warning(f"No server answers at {url}")
    servers = example_servers()
    backend = bar.radio("Example backend", ["local", "serve"], horizontal=True, disabled=alive,
                        help="local: the model runs in the server process (starts in seconds); serve: on Ray Serve.")
    if bar.button("Start the bundled example server", disabled=alive):
        with bar, st.spinner("Starting `uvicorn app:app` (./schema.yaml, ./models/)..."):
            try:
                servers["example"] = start_example(backend)  # type: ignore[arg-type]
            except (RuntimeError, TimeoutError, OSError) as exc:
                st.error(f"The example server did not start: {exc}")
            else:
                state.started_server = (servers["example"].url, servers["example"].api_key)
                st.rerun()
    if (example := servers.get("example")) is not None and example.running:
        bar.caption(f"Example server: pid {example.process.pid} at {example.url}, log {example.log_path}")
        if bar.button("Stop the example server"):
            servers.pop("example").stop()
            st.rerun()
    return url, key, alive


# --- policies ------------------------------------------------------------------------------------


def observation_form(policy: str, specs: list[forms.FieldSpec]) -> dict[str, Any]:
    """The form's widgets; returns the values as the widgets hold them."""
    values: dict[str, Any] = {}
    for group in ([s for s in specs if s.kind in ("int", "float")], [s for s in specs if s.kind == "bool"]):
        columns = st.columns(GRID_COLUMNS) if group else []
        for i, spec in enumerate(group):
            values[spec.name] = scalar_input(columns[i % GRID_COLUMNS], spec, f"{policy}:{spec.name}")
    for spec in (s for s in specs if s.is_list):
        if spec.per_item:
            st.markdown(f"**{spec.label}**")
            cells = st.columns(spec.length or 1)
            item = forms.FieldSpec(spec.name, spec.item_kind)
            values[spec.name] = [
                scalar_input(cells[i], item, f"{policy}:{spec.name}:{i}", label=f"{spec.name}[{i}]")
                for i in range(spec.length or 0)
            ]
        else:
            values[spec.name] = st.text_input(
                spec.label, value=spec.default(), key=f"{policy}:{spec.name}", help="Comma-separated numbers."
            )
    return values


def scalar_input(where: Any, spec: forms.FieldSpec, key: str, label: str | None = None) -> Any:
    label = label or spec.label
    if spec.kind == "bool":
        return where.checkbox(label, key=key, help=spec.description)
    if spec.kind == "int":
        return where.number_input(label, value=0, step=1, key=key, help=spec.description)
    return where.number_input(label, value=0.0, step=0.1, format="%.4f", key=key, help=spec.description)


def policies_tab(client: DemoClient, schema: dict[str, Any], status: dict[str, Any] | None) -> None:
    names = list(schema["policies"])
    default = schema.get("default_policy")
    policy = names[0]
    if len(names) > 1:
        policy = st.selectbox("Policy", names, index=names.index(default) if default in names else 0)
    public = schema["policies"][policy]
    described = ((status or {}).get("policies") or {}).get(policy, {})
    space = described.get("action_space") or public.get("action_space")
    path = policy_path(policy, default, "predict")
    st.caption(f"`POST {path}` · action space: {charts.space_text(space)} · model `{public.get('model')}`")
    specs = forms.field_specs(public.get("observations"), described.get("obs_dim"))
    if not specs:
        st.info("This policy's schema lists no observations: it serves only `/predict_raw`.")
        return
    with st.form(f"observation:{policy}"):
        values = observation_form(policy, specs)
        submitted = st.form_submit_button("Predict", type="primary")
    answer_key = f"answer:{policy}"
    if submitted:
        try:
            body = forms.request_body(specs, values)
            st.session_state[answer_key] = (
                client.predict(policy, default, body), client.distribution(policy, default, body)
            )
        except (forms.FormError, DemoError) as exc:
            st.session_state[answer_key] = exc
    answer = st.session_state.get(answer_key)
    if isinstance(answer, Exception):
        show_error(answer)
    elif answer is not None:
        show_answer(*answer)


def show_answer(predicted: dict[str, Any], distribution: dict[str, Any]) -> None:
    st.subheader("Predicted action")
    probability = predicted.get("probability")
    a, b, c = st.columns(3)
    a.metric("Action", charts.action_text(predicted))
    b.metric("Probability", f"{probability:.3f}" if probability is not None else "— (a density)")
    c.metric("Model version", predicted["model_version"])
    st.caption(f"log-probability {predicted['log_prob']:.4f}")
    frame = charts.distribution_frame(distribution)
    st.subheader("Action distribution")
    if "component" in frame:
        components = frame["component"].unique()
        for column, component in zip(st.columns(len(components)), components):
            with column:
                st.caption(component)
                st.bar_chart(frame[frame["component"] == component], x="action", y="probability", sort=False)
    elif "mean" in frame:
        st.dataframe(frame, hide_index=True)
    else:
        st.bar_chart(frame, x="action", y="probability", sort=False)


# --- LLM -----------------------------------------------------------------------------------------


def llm_tab(client: DemoClient, llm: dict[str, Any], status: dict[str, Any]) -> None:
    limits = llm["limits"]
    st.caption(f"model `{status['model']}` · model version {status['model_version']} · `POST /v1/chat/completions`")
    with st.form("llm"):
        system = st.text_area("System message", "You solve arithmetic step by step.", height=68)
        user = st.text_area("User message", "What is 12 + 30?", height=68)
        a, b, c = st.columns(3)
        n = a.number_input("Samples", min_value=1, max_value=limits["max_num_samples"], value=2, step=1)
        temperature = b.slider("Temperature", 0.0, 2.0, 0.7, 0.05)
        max_tokens = c.number_input("Max new tokens", min_value=1, max_value=limits["max_new_tokens"],
                                    value=min(32, limits["max_new_tokens"]), step=1)
        submitted = st.form_submit_button("Generate", type="primary")
    if submitted:
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}
        ]
        try:
            st.session_state["llm_answer"] = client.chat(messages, int(n), float(temperature), int(max_tokens))
        except DemoError as exc:
            st.session_state["llm_answer"] = exc
    answer = st.session_state.get("llm_answer")
    if isinstance(answer, Exception):
        show_error(answer)
    elif answer is not None:
        st.caption(f"{answer['system_fingerprint']} · {answer['usage']['completion_tokens']} tokens generated")
        for choice in answer["choices"]:
            st.markdown(f"**Sample {choice['index'] + 1}** (finish: {choice['finish_reason']})")
            st.code(choice["message"]["content"] or "(empty)", language=None, wrap_lines=True)
            frame = charts.token_log_prob_frame(choice)
            st.bar_chart(frame, x="label", y="logprob", sort=False, x_label="token", height=220)
            with st.expander("Per-token logprobs"):
                st.dataframe(frame.drop(columns="label"), hide_index=True)


# --- training ------------------------------------------------------------------------------------


def _history(key: str, point: dict[str, Any]) -> list[dict[str, Any]]:
    """Append a poll (its ``t`` is seconds since this key's first poll) to the session's history."""
    t0 = st.session_state.setdefault(f"{key}:t0", time.monotonic())
    point["t"] = round(time.monotonic() - t0, 1)
    st.session_state[key] = charts.append_point(st.session_state.get(key, []), point)
    return st.session_state[key]


@st.fragment(run_every=POLL_S)
def training_panel(url: str, key: str, policy: str) -> None:
    with DemoClient(url, key) as client:
        try:
            status = client.training_status(policy)
        except DemoError as exc:
            show_error(exc)
            return
    history = _history(f"train:{url}:{policy}", charts.training_point(status, 0.0))
    st.subheader(f"Training `{policy}` ({status['algorithm']})")
    cells = st.columns(6)
    mean = status["mean_return"]
    for cell, (label, value) in zip(cells, [
        ("State", status["state"]), ("Model version", status["model_version"]), ("Updates", status["updates"]),
        ("Episodes", status["episodes"]), ("Mean return", "—" if mean is None else f"{mean:.1f}"),
        ("Samples/s", status["samples_per_second"]),
    ]):
        cell.metric(label, value)
    frame = charts.history_frame(history)
    left, right = st.columns(2)
    with left:
        st.caption(f"Episode return (mean of the last {status['return_window']}, and the last) over time (s)")
        st.line_chart(frame[["mean_return", "last_return"]])
    with right:
        st.caption("Model version over time (s)")
        st.line_chart(frame[["model_version"]])
    if status["recent_returns"]:
        st.caption("Returns of the latest episodes")
        st.bar_chart(charts.returns_frame(status), height=200)
    if status.get("last_error"):
        st.error(f"The trainer's last error: {status['last_error']}")


@st.fragment(run_every=POLL_S)
def grpo_panel(url: str, key: str, prefix: str) -> None:
    with DemoClient(url, key) as client:
        try:
            runs = client.grpo_runs(prefix)
            if not runs:
                st.info(f"No GRPO run yet: start one with `POST /{prefix}/grpo/runs`.")
                return
            run_id = st.selectbox("GRPO run", [r["run_id"] for r in runs], index=len(runs) - 1)
            status = client.grpo_status(run_id, prefix)
        except DemoError as exc:
            show_error(exc)
            return
    st.subheader(f"GRPO run `{run_id}`")
    mean, loss = status["mean_reward"], status["last_loss"]
    for cell, (label, value) in zip(st.columns(5), [
        ("State", status["state"]), ("Cycle (model version)", status["cycle"]),
        ("Mean reward", "—" if mean is None else f"{mean:.3f}"), ("Last loss", "—" if loss is None else f"{loss:.4f}"),
        ("Stale groups", status["rejected_stale"]),
    ]):
        cell.metric(label, value)
    history = _history(f"grpo:{url}:{run_id}", {"cycle": status["cycle"]})
    left, right = st.columns(2)
    with left:
        st.caption("Mean reward of each cycle's group")
        st.line_chart(charts.grpo_frame(status))
    with right:
        st.caption("Cycle over time (s)")
        st.line_chart([{"t": p["t"], "cycle": p["cycle"]} for p in history], x="t", y="cycle")


# --- the page ------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="policy-server demo", layout="wide")
    url, key, alive = sidebar()
    st.title("policy-server demo")
    if not alive:
        st.info(f"No server answers at {url}: run `uvicorn app:app`, or start the bundled example in the sidebar.")
        return
    with DemoClient(url, key) as client:
        try:
            schema = client.schema()
        except DemoError as exc:
            show_error(exc)
            return
        status = None
        if schema["policies"]:
            try:
                status = client.status()
            except DemoError:
                status = None  # the form then takes the action spaces from the schema
        llm = (schema.get("llm") or {}).get("policy")
        llm_status = None
        if llm is not None:
            try:
                llm_status = client.llm_status(llm["route_prefix"])
            except DemoError as exc:
                show_error(exc)
        trainable = [name for name, p in schema["policies"].items() if p.get("training")]
        grpo = llm is not None and llm_status is not None and llm.get("training") is not None
        tabs = [name for name, shown in [("Policies", bool(schema["policies"])), ("LLM", llm_status is not None),
                                         ("Training", bool(trainable) or grpo)] if shown]
        if not tabs:
            st.info("This server serves nothing the demo can show.")
            return
        for tab, name in zip(st.tabs(tabs), tabs):
            with tab:
                if name == "Policies":
                    policies_tab(client, schema, status)
                elif name == "LLM":
                    llm_tab(client, llm, llm_status)  # type: ignore[arg-type]
                else:
                    for policy in trainable:
                        training_panel(url, key, policy)
                    if grpo:
                        grpo_panel(url, key, llm["route_prefix"])  # type: ignore[index]


main()
