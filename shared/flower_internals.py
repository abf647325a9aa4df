"""Every private or undocumented Flower (and Ray) name the project uses, fenced in one module.

Flower has no public API for what the warm simulation runtime (simulations/runtime/) does: run
Flower's simulation engine in this process, as `flwr-simulation` does, over a standing pool of
Flower's ClientApp actors. Each name of Flower's or Ray's insides that takes is used here, behind
a small function, and nowhere else. PINNED lists them with the parameters and attributes the
project relies on; tests/test_flower_internals.py checks each against the installed Flower.
Written for flwr FLOWER_VERSION: on any other, `supported()` is False and the runtime takes
Flower's public path instead (simulations/runtime/public_path.py). Nothing private is imported
at module level, so this module loads on any Flower version.

A deployed merchant's SuperNode is another user (deploy/supernode.py, deploy/warm_clientapp.py):
its idle waits and object-pull backoff shortened (`prompt_supernode_polling`,
`prompt_object_pulls`), a FAB unpacked once (`install_each_fab_once`), its log lines timestamped
(`timestamp_flower_logs`), Flower's commands run in processes of ours (`run_flower_command`), and
the name SuperExec starts a ClientApp by (`CLIENTAPP_COMMAND`). The operator's tools read the
code of the CLI's "no such run" error (`run_not_found_error`, deploy/runs.py).

A local two-node Ray cluster is another (`ray_worker_node_on_loopback`: Ray's `ray start` for a
second node on this machine's loopback, which Ray's public switches cannot give).

Secure aggregation is another: Flower 1.42's SecAgg+ exists only in its legacy API
(`flwr.server.workflow.SecAggPlusWorkflow` over a LegacyContext and a legacy Strategy,
`flwr.client.mod.secaggplus_mod` reading a legacy FitRes), so the server's exchange
(`secure_mean`) and the client's adapters (`secaggplus`, `secure_threshold`, `fit_instruction`,
`add_fit_result`) live here too. Apart from these functions, application code (client/, server/,
shared/) uses only Flower's public `flwr.app`, `flwr.clientapp` and `flwr.serverapp`.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import logging
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

from flwr.app import Message

from shared.app_log import FLOWER_LOGGER, logger_level

FLOWER_VERSION = "1.42.0"


@dataclass(frozen=True)
class Pinned:
    """One private name: `name` (dotted for a class member) in `module`; the keyword parameters
    the project passes it; the attributes it reads or sets on it or on its instances; text its
    source must hold for a behaviour the project relies on."""

    module: str
    name: str
    parameters: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    source: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


_RAY_ACTOR = "flwr.simulation.ray_transport.ray_actor"
_RAY_BACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"
_GRID = "flwr.superlink.grid.inmemory_grid"
_VCE = "flwr.server.superlink.fleet.vce.vce_api"
_WORKFLOW_CONSTANT = "flwr.server.workflow.constant"
_COMPAT = "flwr.compat.common.recorddict_compat"
_SECAGG_CONSTANTS = "flwr.common.secure_aggregation.secaggplus_constants"
_SUPERNODE = "flwr.supernode.start_client_internal"
_NODESTATE = "flwr.supernode.nodestate.in_memory_nodestate"
_INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"
_RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"
_CLIENTAPP_CLI = "flwr.supernode.cli.flwr_clientapp"
_SUPEREXEC_LOOP = "flwr.supercore.superexec.run_superexec"
_SUPERLINK_APP = "flwr.superlink.main"
_SUBPROCESS_EXECUTOR = "flwr.supercore.superexec.executor.subprocess_executor"
_CONTROL_MIDDLEWARE = "flwr.superlink.routers.control.middlewares"
_FLEET_MIDDLEWARE = "flwr.superlink.routers.fleet.middlewares"
_NODE_AUTH = "flwr.superlink.routers.fleet.node_auth"
_FLEET_ROUTER = "flwr.superlink.routers.fleet.router"
_RUNTIME_ROUTER = "flwr.supercore.routers.runtime.router"
_TELEMETRY = "flwr.supercore.telemetry"

PINNED: tuple[Pinned, ...] = (
    # the engine, run as `flwr-simulation` runs it (`run_engine`)
    Pinned("flwr.simulation.run_simulation", "_run_simulation", parameters=(
        "num_supernodes", "exit_event", "server_app", "client_app_attr", "backend_config", "app_dir", "run", "server_app_context", "is_app")),
    Pinned("flwr.supercore.run", "Run", attributes=("run_id", "override_config", "primary_task_id", "federation_id")),
    Pinned("flwr.supercore.run", "Run.create_empty", parameters=("run_id",)),
    Pinned("flwr.supercore.task_identity", "TaskIdentity", attributes=("task_id", "run_id", "node_id", "_task_id", "_run_id", "_node_id")),
    Pinned("flwr.common.constant", "SUPERLINK_NODE_ID"),
    Pinned("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    Pinned("flwr.common.config", "get_fused_config_from_dir", parameters=("project_dir", "override_config")),
    Pinned("flwr.supercore.telemetry", "EventType", attributes=("FLWR_SIMULATION_RUN_LEAVE",)),
    # the ServerApp, loaded as Flower loads it and called with keywords (`load_server_app`)
    Pinned("flwr.supercore.object_ref", "load_app", parameters=("module_attribute_str", "error_type", "project_dir")),
    Pinned("flwr.serverapp.server_app", "LoadServerAppError"),
    Pinned("flwr.server.run_serverapp", "run", source=("server_app(grid=grid, context=context)",)),
    # the standing pool of actors (`new_actor_pool`, `free_actors`, `every_actor`, `pool_size`)
    Pinned(_RAY_ACTOR, "BasicActorPool", parameters=("actor_type", "client_resources", "actor_kwargs"),
           attributes=("pool", "num_actors", "actors_capacity", "add_actors_to_pool", "_future_to_actor")),
    Pinned(_RAY_ACTOR, "ClientAppActor", parameters=("on_actor_init_fn",)),
    # the backend swap (`standing_backend`): Flower looks the class up in its module for each run
    Pinned(_RAY_BACKEND, "RayBackend", attributes=("build", "terminate", "pool", "app_fn")),
    Pinned(_RAY_BACKEND, "RayBackend.build", parameters=("app_fn",)),
    # a message whose actor died: Flower puts the dead actor back in the pool (`replace_dead_actors`)
    Pinned(_RAY_BACKEND, "RayBackend.process_message", parameters=("message", "context"),
           source=("self.pool.add_actor_back_to_pool(future)",)),
    Pinned(_RAY_BACKEND, "RayBackend.init_ray", source=("if not ray.is_initialized():",)),
    Pinned("flwr.server.superlink.fleet.vce.vce_api", "start_vce", source=("from .backend.raybackend import RayBackend",)),
    # the grid's exchange, re-implemented with checks (`CheckedGrid`)
    Pinned(_GRID, "InMemoryGrid", attributes=("pull_interval", "push_messages", "pull_messages", "get_node_ids")),
    Pinned(_GRID, "InMemoryGrid.send_and_receive", parameters=("messages", "timeout"),
           source=("self.push_messages(", "self.pull_messages(", "reply_to_message_id", "time.sleep(self.pull_interval)")),
    # the engine's two loops between the grid's state and the actors, woken instead of looking
    # every 0.1 s (`prompt_engine_loops`): their bodies re-implemented, their names looked up by run_api
    Pinned(_VCE, "add_messages_to_queue", parameters=("state", "queue", "nodes_mapping", "f_stop"),
           source=("for node_id in nodes_mapping.keys():", "state.get_message_ins(node_id=node_id, limit=1)", "queue.put(msg)",
                   "f_stop.wait(0.1)")),
    Pinned(_VCE, "put_message_into_state", parameters=("state", "queue", "f_stop"),
           source=("message_reply = queue.get(timeout=1.0)", "state.store_message_res(message_reply)")),
    Pinned(_VCE, "run_api", source=("target=add_messages_to_queue,", "target=put_message_into_state,")),
    # the test helpers' message identity and serialization (`server_identity`, `wire_bytes`,
    # `wire_objects`, `message_from_wire`)
    Pinned("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
    Pinned("flwr.supercore.inflatable.inflatable_utils", "inflate_object_from_contents", parameters=("object_id", "object_contents")),
    # Ray: every actor's readiness method (`actor_ready`), the driver's logger (`quiet_ray_driver`)
    Pinned("ray.actor", "_modify_class", source=("def __ray_ready__",)),
    Pinned("ray._private.worker", "logger"),
    Pinned("ray._private.worker", "init", source=("SIGTERM handler is not set",)),
    # Ray: a worker node on this machine's loopback (`ray_worker_node_on_loopback`): `ray start`
    # swaps 127.0.0.1 for the outward address, and then its raylet listens on every interface
    Pinned("ray._private.services", "resolve_ip_for_localhost", source=('host == "127.0.0.1"',)),
    Pinned("ray.scripts.scripts", "main"),
    Pinned("ray.scripts.scripts", "start.callback", source=("services.resolve_ip_for_localhost(node_ip_address)",
                                                   "if not ray_constants.ENABLE_RAY_CLUSTER:")),
    # Flower's SecAgg+ (`secure_mean` on the server, `secaggplus`, `secure_threshold`,
    # `fit_instruction`, `add_fit_result` on the client): its workflow speaks the legacy
    # Strategy/FitIns/FitRes API through a LegacyContext; its mod reads a legacy FitRes
    Pinned("flwr.server.workflow", "SecAggPlusWorkflow", parameters=(
        "num_shares", "reconstruction_threshold", "max_weight", "clipping_range", "quantization_range", "modulus_range", "timeout"),
        source=("context.strategy.configure_fit(", "context.strategy.aggregate_fit(", "fitres.parameters = parameters",
                "offset = -(len(active_nids) - 1) * state.clipping_range")),
    Pinned("flwr.server", "LegacyContext", parameters=("context", "strategy")),
    Pinned("flwr.server.strategy", "Strategy", attributes=(
        "initialize_parameters", "configure_fit", "aggregate_fit", "configure_evaluate", "aggregate_evaluate", "evaluate")),
    Pinned("flwr.server.client_proxy", "ClientProxy", attributes=("get_properties", "get_parameters", "fit", "evaluate", "reconnect")),
    Pinned(_WORKFLOW_CONSTANT, "MAIN_CONFIGS_RECORD"),
    Pinned(_WORKFLOW_CONSTANT, "MAIN_PARAMS_RECORD"),
    Pinned(_WORKFLOW_CONSTANT, "Key", attributes=("CURRENT_ROUND",)),
    Pinned(_COMPAT, "parameters_to_arrayrecord", parameters=("parameters", "keep_input")),
    Pinned(_COMPAT, "recorddict_to_fitins", parameters=("recorddict", "keep_input")),
    Pinned(_COMPAT, "fitres_to_recorddict", parameters=("fitres", "keep_input")),
    Pinned("flwr.common", "FitIns", parameters=("parameters", "config")),
    Pinned("flwr.common", "FitRes", parameters=("status", "parameters", "num_examples", "metrics")),
    Pinned("flwr.common", "Status", parameters=("code", "message")),
    Pinned("flwr.common", "Code", attributes=("OK",)),
    Pinned("flwr.common", "ndarrays_to_parameters"),
    Pinned("flwr.common", "parameters_to_ndarrays"),
    Pinned("flwr.client.mod", "secaggplus_mod", source=("out_msg = call_next(msg, ctxt)", "arr_record.clear()")),
    Pinned("flwr.client.mod.secure_aggregation.secaggplus_mod", "_collect_masked_vectors",
           source=("ratio = num_examples / state.max_weight", "quantize(")),
    Pinned(_SECAGG_CONSTANTS, "RECORD_KEY_CONFIGS"),
    Pinned(_SECAGG_CONSTANTS, "RECORD_KEY_STATE"),
    Pinned(_SECAGG_CONSTANTS, "Key", attributes=("STAGE", "THRESHOLD", "SAMPLE_NUMBER", "MASKED_PARAMETERS")),
    Pinned("flwr.common", "bytes_to_ndarray"),
    Pinned(_SECAGG_CONSTANTS, "Stage", attributes=("SETUP", "COLLECT_MASKED_VECTORS")),
    # a deployed SuperNode without idle waits (`prompt_supernode_polling`, `run_flower_command`): Flower
    # waits 3 s after every empty pull and 0.5 s between looks for the ClientApp's reply
    Pinned(_SUPERNODE, "time", attributes=("sleep",)),
    Pinned(_SUPERNODE, "start_client_internal", source=("time.sleep(3)", '"flower-superexec"', "run_id = _pull_and_store_message(")),
    # the SuperExec woken by its SuperNode when a message is stored (`notify_stored_messages`,
    # `superexec_waits_with`, deploy/superexec.py): Flower's SuperExec asks its SuperNode for work
    # after every FLWR_SUPEREXEC_TASK_POLL_INTERVAL (1 s by default)
    Pinned(_SUPERNODE, "_pull_and_store_message", source=("state.create_task(", "return run_id")),
    Pinned(_SUPEREXEC_LOOP, "time", attributes=("sleep",)),
    Pinned(_SUPEREXEC_LOOP, "run_superexec", source=("client.AcquireTask(", "time.sleep(task_poll_interval)")),
    Pinned("flwr.supercore.cli", "flower_superexec"),
    # `deploy.superlink start --in-memory` passes this value as flower-superlink's --database
    Pinned("flwr.supercore.constant", "FLWR_IN_MEMORY_DB_NAME"),
    # the operator's `flwr ls --run-id N --format json` for a run the SuperLink does not know
    # (`RUN_NOT_FOUND_ERROR`, deploy.runs.run_status): the CLI prints the error's code
    Pinned("flwr.supercore.error.base", "ApiErrorCode", attributes=("RUN_ID_NOT_FOUND",)),
    Pinned("flwr.cli.utils", "_format_flower_error", source=('f"[code: {err.code}]"',)),
    Pinned(_SUPERNODE, "_push_messages", source=("time.sleep(0.5)",)),
    # ... those waits end when the ClientApp stores its reply or its objects (`wake_on_clientapp_stores`):
    # the SuperNode's Runtime API stores them through these two methods of its in-memory state
    Pinned(_NODESTATE, "InMemoryNodeState.store_message_and_object_tree", parameters=("message", "object_tree", "session_id")),
    Pinned(_NODESTATE, "InMemoryNodeState.store_object"),
    Pinned("flwr.supernode.nodestate.nodestate_factory", "NodeStateFactory", source=("InMemoryNodeState(object_store)",)),
    Pinned("flwr.supernode.servicer.runtime.runtime_handlers", "push_messages", source=("state.store_message_and_object_tree(",)),
    Pinned("flwr.supernode.servicer.runtime.runtime_handlers", "push_object", source=("state.store_object(",)),
    Pinned("flwr.supernode.cli", "flower_supernode"),
    # the warm ClientApp (deploy/warm_clientapp.py): SuperExec starts `flwr-clientapp` by name, with
    # its arguments; a process forked from a warm one runs Flower's own entry point with them
    Pinned("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND"),
    # ... and keeps nothing of the process it starts, so a run handed to the warm process needs
    # none (`launch_clientapps_with`)
    Pinned(_SUBPROCESS_EXECUTOR, "subprocess", attributes=("Popen", "DEVNULL")),
    Pinned(_SUBPROCESS_EXECUTOR, "SubprocessExecutor.launch",
           source=("TASK_TYPE_TO_COMMAND[spec.task_type]",
                   "        subprocess.Popen(  # pylint: disable=consider-using-with\n                args,\n"
                   "                stdout=subprocess.DEVNULL,\n                stderr=subprocess.DEVNULL,\n            )\n"
                   "            return LaunchResult.accepted()",
                   "        subprocess.Popen(args)  # pylint: disable=consider-using-with\n\n        return LaunchResult.accepted()")),
    Pinned("flwr.supernode.cli", "flwr_clientapp"),
    # object pulls retried sooner (`prompt_object_pulls`): a message announced before its objects
    # have arrived is pulled again after 1 s, then 2 s, 4 s, ...
    Pinned(_INFLATABLE, "pull_objects", parameters=("initial_backoff", "backoff_cap")),
    Pinned(_INFLATABLE, "pull_and_inflate_object_from_tree", parameters=("initial_backoff", "backoff_cap")),
    # the ClientApp process unpacks the FAB again for every message (`install_each_fab_once`)
    Pinned(_RUN_CLIENTAPP, "install_from_fab", parameters=("fab_file", "install_dir", "skip_prompt")),
    # ... and a ClientApp run in the warm process itself (`run_clientapp_here`): run_clientapp's
    # steps, in its order, by its module's own names (its body is checked for the steps mirrored)
    Pinned(_RUN_CLIENTAPP, "run_clientapp",
           source=("install_from_fab(fab.content, skip_prompt=True)",
                   'RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")', "RuntimeTokenHttpInterceptor(token)",
                   "heartbeat_sender = HeartbeatSender(make_task_heartbeat_fn_http(client))",
                   "message, context, run, fab = pull_task_input(client)",
                   'default_app_ref="",\n            app_path=None,\n            multi_app=True,',
                   "reply_message = client_app(message=message, context=context)",
                   "if isinstance(ex, LoadClientAppError):",
                   "reply_message = Message(Error(code=e_code, reason=reason), reply_to=message)",
                   "push_message(client, reply_message, context)", "retry_invoker.max_tries = 1",
                   "if runtime_dependency_install:", "start_parent_process_monitor(parent_pid)", "register_signal_handlers(")),
    Pinned(_RUN_CLIENTAPP, "make_simple_http_retry_invoker"),
    Pinned(_RUN_CLIENTAPP, "RuntimeHttpClient", attributes=("from_server_address", "close")),
    Pinned(_RUN_CLIENTAPP, "RuntimeTracingInterceptor"),
    Pinned(_RUN_CLIENTAPP, "RuntimeVersionHttpInterceptor", parameters=("component_name",)),
    Pinned(_RUN_CLIENTAPP, "RuntimeTokenHttpInterceptor"),
    Pinned(_RUN_CLIENTAPP, "HeartbeatSender", attributes=("start", "stop", "is_running")),
    Pinned(_RUN_CLIENTAPP, "make_task_heartbeat_fn_http"),
    Pinned(_RUN_CLIENTAPP, "pull_task_input"),
    Pinned(_RUN_CLIENTAPP, "push_message"),
    Pinned(_RUN_CLIENTAPP, "push_task_output", parameters=("client", "context", "sub_status", "details")),
    Pinned(_RUN_CLIENTAPP, "get_load_client_app_fn", parameters=("default_app_ref", "app_path", "multi_app")),
    Pinned(_RUN_CLIENTAPP, "LoadClientAppError"),
    Pinned(_RUN_CLIENTAPP, "event"),
    Pinned(_RUN_CLIENTAPP, "EventType", attributes=("FLWR_CLIENTAPP_RUN_ENTER", "FLWR_CLIENTAPP_RUN_LEAVE")),
    Pinned(_CLIENTAPP_CLI, "_parse_args_run_flwr_clientapp"),
    Pinned(_CLIENTAPP_CLI, "try_obtain_flwr_app_token"),
    Pinned(_CLIENTAPP_CLI, "validate_and_resolve_root_certificates"),
    Pinned("flwr.common.constant", "ErrorCode", attributes=("CLIENT_APP_RAISED_EXCEPTION", "LOAD_CLIENT_APP_EXCEPTION")),
    Pinned("flwr.common.constant", "SubStatus", attributes=("COMPLETED", "FAILED")),
    # the time of day on every line of a SuperNode's log (`timestamp_flower_logs`)
    Pinned("flwr.supercore.logger", "ConsoleHandler", attributes=("timestamps",)),
    # the SuperLink's HTTP layers, each only under the API it serves (`scope_superlink_middleware`):
    # each layer below passes every request outside its prefix straight on, so skipping it there
    # changes nothing but the cost (SUPERLINK_LAYER_SCOPES)
    Pinned(_SUPERLINK_APP, "_get_middleware", source=("Middleware(NodeAuthMiddleware)", "Middleware(ProtobufTranslationMiddleware)")),
    Pinned(_SUPERLINK_APP, "create_app", source=("middleware=_get_middleware()",)),
    Pinned("flwr.superlink.cli", "flower_superlink"),
    Pinned(_CONTROL_MIDDLEWARE, "_is_control_path", source=('path.startswith("/v1/control/")',)),
    Pinned(_CONTROL_MIDDLEWARE, "CONTROL_SENSITIVE_ROUTE_KEYS"),
    Pinned(_CONTROL_MIDDLEWARE, "ControlSensitiveResponseMiddleware.dispatch", source=("if _is_control_sensitive_route(request):",)),
    Pinned(_CONTROL_MIDDLEWARE, "ControlAuthenticationMiddleware.dispatch",
           source=("if not _is_control_path(request.url.path) or _is_control_auth_route(request):\n            return await call_next(request)",)),
    Pinned(_CONTROL_MIDDLEWARE, "ControlLicenseMiddleware.dispatch",
           source=("if self._license_plugin is None or not _is_control_path(request.url.path):\n            return await call_next(request)",)),
    Pinned(_CONTROL_MIDDLEWARE, "ControlEventLogMiddleware.dispatch",
           source=("if not _is_control_path(request.url.path) or _is_control_sensitive_route(\n            request\n        ):\n"
                   "            return await call_next(request)",)),
    Pinned(_NODE_AUTH, "NodeAuthMiddleware.dispatch", source=('if request.url.path.startswith("/v1/fleet/") and isinstance(',)),
    Pinned(_FLEET_MIDDLEWARE, "FleetEventLogMiddleware.dispatch",
           source=('if not request.url.path.startswith("/v1/fleet/"):\n            return await call_next(request)',)),
    # a route's synchronous functions run in the event loop's thread (`run_handlers_inline`):
    # FastAPI and Flower's protobuf routes hand them to worker threads by these names
    Pinned("fastapi.dependencies.utils", "run_in_threadpool"),
    Pinned("fastapi.routing", "run_in_threadpool"),
    Pinned("flwr.supercore.protobuf.routing", "run_in_threadpool"),
    Pinned("flwr.supercore.protobuf.routing", "ProtobufRoute", source=("await run_in_threadpool(endpoint, *args, **endpoint_kwargs)",)),
    Pinned(_NODE_AUTH, "run_in_threadpool"),
    Pinned(_NODE_AUTH, "NodeAuthMiddleware.dispatch", source=("await run_in_threadpool(authenticate_node, request)",)),
    Pinned(_NODE_AUTH, "authenticate_node"),
    # ... and Starlette's BaseHTTPMiddleware layers (Flower's error and protobuf translation, node
    # authentication, the Fleet event log) call the layers below in the request's own task
    # (`_dispatch_in_this_task`): the layer's dispatch, its wrapped receive, what __call__ reads
    Pinned("starlette.middleware.base", "BaseHTTPMiddleware.__call__",
           source=("request = _CachedRequest(scope, receive)", "response = await self.dispatch_func(request, call_next)",
                   "await response(scope, wrapped_receive, send)", 'raise RuntimeError("No response returned.")')),
    Pinned("starlette.middleware.base", "BaseHTTPMiddleware", attributes=("app", "dispatch_func")),
    Pinned("starlette.middleware.base", "_CachedRequest", attributes=("wrapped_receive",)),
    # ... and the SuperNode's own HTTP app, the ClientApps' Runtime API, gets the layer
    # (`run_supernode_handlers_inline`); its acquire-task only claims a task from its state
    Pinned("flwr.supernode.main", "create_app", parameters=("state_factory", "superexec_auth_secret")),
    Pinned("flwr.supernode.servicer.runtime.runtime_handlers", "acquire_task", source=("return core_runtime_handlers.acquire_task(request, state)",)),
    Pinned("flwr.supernode.cli.flower_supernode", "_start_supernode_http_api", source=("from flwr.supernode.main import (",)),
    # pulls held while there is nothing to pull (`PULL_ROUTES`, deploy/held_pulls.py): the routes
    # by which SuperNodes and ServerApps pull and push messages, and the protobufs it reads
    Pinned(_FLEET_ROUTER, "fleet_pull_messages", source=('@router.post("/pull-messages")',)),
    Pinned(_FLEET_ROUTER, "fleet_push_messages", source=('@router.post("/push-messages")',)),
    Pinned(_FLEET_ROUTER, "router", attributes=("prefix",)),
    Pinned(_RUNTIME_ROUTER, "pull_messages", source=('@router.post("/pull-messages")',)),
    Pinned(_RUNTIME_ROUTER, "push_messages", source=('@router.post("/push-messages")',)),
    Pinned(_RUNTIME_ROUTER, "router", attributes=("prefix",)),
    Pinned("flwr.proto.fleet_pb2", "PullMessagesRequest"),
    Pinned("flwr.proto.fleet_pb2", "PullMessagesResponse"),
    Pinned("flwr.proto.runtime_pb2", "PullAppMessagesResponse"),
    Pinned("flwr.proto.runtime_pb2", "PushAppMessagesRequest"),
    # an event Flower does not send is not built (`skip_unsent_telemetry`): `event` builds it in
    # `create_event`, which reads the switches, and sends it only with the first
    Pinned(_TELEMETRY, "create_event", source=('if FLWR_TELEMETRY_ENABLED == "1":', 'return "disabled"')),
    Pinned(_TELEMETRY, "event", source=("result.set_result(create_event(event_type, event_details))",)),
    Pinned(_TELEMETRY, "FLWR_TELEMETRY_ENABLED"),
    Pinned(_TELEMETRY, "FLWR_TELEMETRY_LOGGING"),
)


# Flower's functions that one of ours stands in for in this process, by ours (`_stand_in`)
_FLOWERS_BY_STAND_IN: dict[Callable[..., Any], Callable[..., Any]] = {}


def resolve(pinned: Pinned) -> Any:
    """The pinned object itself (Flower's, also where one of ours stands in for it in this
    process); raises ImportError or AttributeError when it is gone."""
    value: Any = importlib.import_module(pinned.module)
    for part in pinned.name.split("."):
        value = getattr(value, part)
    return _FLOWERS_BY_STAND_IN.get(value, value) if inspect.isfunction(value) else value


def _stand_in(module: Any, name: str, ours: Callable[..., Any]) -> None:
    """`ours` in place of Flower's `module.name` in this process (in place of an earlier stand-in
    of ours, if any: Flower's stays the one `resolve` gives)."""
    current = getattr(module, name)
    if current is not ours:
        _FLOWERS_BY_STAND_IN[ours] = _FLOWERS_BY_STAND_IN.get(current, current)
        setattr(module, name, ours)


def installed_version() -> str | None:
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


def version_matches() -> bool:
    """Whether the installed flwr is the one this module was written for (cheap: imports nothing)."""
    return installed_version() == FLOWER_VERSION


def unresolved() -> list[str]:
    """The pinned names that do not import (each costs the import of its module, Ray's included)."""
    missing = []
    for pinned in PINNED:
        try:
            resolve(pinned)
        except (ImportError, AttributeError):
            missing.append(pinned.path)
    return missing


def supported() -> bool:
    """Whether the warm runtime may use Flower's internals: the installed flwr is FLOWER_VERSION
    and every pinned name still imports."""
    return version_matches() and not unresolved()


@contextmanager
def server_identity() -> Iterator[None]:
    """For tests that build server-side messages outside Flower's runtime: the task identity
    Flower's runtime gives the ServerApp side (a Message is stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def wire_objects(message: Message) -> dict[str, bytes]:
    """The objects Flower sends for `message`, by object id, serialized: one request each at every hop."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}


def wire_bytes(message: Message) -> bytes:
    """Every byte Flower would send for `message`: its serialized objects, as the wire carries them."""
    return b"".join(wire_objects(message).values())


def message_from_wire(message_id: str, objects: dict[str, bytes]) -> Message:
    """The message a receiver rebuilds from `objects` (wire_objects), as Flower's runtime does."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    return cast(Message, inflate_object_from_contents(message_id, dict(objects)))


@contextmanager
def quiet_ray_driver() -> Iterator[None]:
    """Joining Ray from a thread other than the main one logs that it set no SIGTERM handler
    (the harness has its own: deploy.processes.terminate_as_exit)."""
    with logger_level("ray._private.worker", logging.ERROR):
        yield


def load_server_app(reference: str, project_dir: Path) -> Any:
    """The ServerApp `reference` ("module:attribute") names, loaded as Flower loads it."""
    from flwr.serverapp.server_app import LoadServerAppError
    from flwr.supercore.object_ref import load_app

    return load_app(reference, LoadServerAppError, project_dir)


def new_actor_pool(client_resources: Mapping[str, float], on_actor_init: Callable[[], None]) -> Any:
    """Flower's pool of ClientApp actors, as many as the Ray cluster holds; each runs
    `on_actor_init` as it starts, in the background."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    pool = BasicActorPool(ClientAppActor, dict(client_resources), {"on_actor_init_fn": on_actor_init})
    pool.add_actors_to_pool(pool.actors_capacity)
    return pool


def free_actors(pool: Any) -> list[Any]:
    return list(pool.pool)


def every_actor(pool: Any) -> list[Any]:
    """Free or busy: Flower's pool keeps the busy ones by the future of their job."""
    return list(pool.pool) + list(pool._future_to_actor.values())


def pool_size(pool: Any) -> int:
    return int(pool.num_actors)


def actor_ready(actor: Any) -> Any:
    """A Ray object ref that resolves once `actor` answers (Ray's readiness method of every actor)."""
    return actor.__ray_ready__.remote()


def replace_dead_actors(pool: Any, timeout: float = 5.0) -> int:
    """Swap every idle actor of `pool` that does not answer for a new one; how many were swapped.
    Flower returns the actor of a failed message to its pool even when the actor died, so one
    killed worker would fail every message routed to it for the rest of the run."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    dead = []
    for actor in list(pool.pool):
        try:
            ray.get(actor_ready(actor), timeout=timeout)
        except RayActorError:
            dead.append(actor)
        except GetTimeoutError:
            continue  # still starting (a replacement builds its data): alive
    for actor in dead:
        try:
            pool.pool.remove(actor)
        except ValueError:
            continue  # another thread took it meanwhile: its message fails and that thread swaps it
        pool.num_actors -= 1
        pool.add_actors_to_pool(1)
    return len(dead)


@contextmanager
def standing_backend(pool: Any, built: threading.Event) -> Iterator[None]:
    """Flower's engine builds its Ray backend by class name at the start of a run: while this
    lasts, that class takes the standing `pool` (setting `built`) and leaves it, and Ray, up at
    the end (Flower's own kills the actors and shuts Ray down after every run)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from ray.exceptions import RayActorError

    flower_backend = raybackend.RayBackend

    class StandingPoolBackend(flower_backend):  # type: ignore[misc, valid-type]
        def build(self, app_fn: Any) -> None:
            self.pool = pool
            self.app_fn = app_fn
            built.set()

        def terminate(self) -> None:
            pass

        def process_message(self, message: Any, context: Any) -> Any:
            try:
                return super().process_message(message, context)
            except RayActorError:
                replace_dead_actors(self.pool)  # else every later message sent to it fails too
                raise

    raybackend.RayBackend = StandingPoolBackend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = flower_backend  # type: ignore[misc]


class _EngineWakeups:
    """The simulation's grid and Flower's engine, in this process, telling each other that there
    is something to look at: Flower's engine looks for pushed messages every 0.1 s and its grid
    for replies every 0.1 s (InMemoryGrid.pull_interval), so a simulated exchange ended up to
    0.2 s after its work did, and rounds came in 0.1 s steps whatever their work. Each still looks
    at least that often (a wake-up missed costs no more than Flower's own wait)."""

    def __init__(self) -> None:
        self.pushed = threading.Event()  # the grid pushed messages: the engine looks for them
        self.replied = threading.Event()  # the engine stored a reply: the grid looks for it


ENGINE_WAKEUPS = _EngineWakeups()
ENGINE_LOOK = 0.1  # Flower's engine's interval, still the longest


def _add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Flower's vce_api.add_messages_to_queue, looking again as soon as the grid pushes (and at
    once after finding a message: a node may have another)."""
    while not f_stop.is_set():
        ENGINE_WAKEUPS.pushed.clear()  # before looking: a push during the look wakes the wait below
        found = False
        for node_id in nodes_mapping.keys():
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                found = True
        if not found:
            ENGINE_WAKEUPS.pushed.wait(ENGINE_LOOK)


def _put_message_into_state(state: Any, queue: Any, f_stop: threading.Event) -> None:
    """Flower's vce_api.put_message_into_state, telling the grid of each reply it stores."""
    from queue import Empty

    while not f_stop.is_set():
        try:
            message_reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(message_reply)
        ENGINE_WAKEUPS.replied.set()


def prompt_engine_loops() -> None:
    """In this process, Flower's simulation engine (started after this) runs the two loops above."""
    module = importlib.import_module(_VCE)
    _stand_in(module, "add_messages_to_queue", _add_messages_to_queue)
    _stand_in(module, "put_message_into_state", _put_message_into_state)


class CheckedGrid:
    """Flower's grid of one run, calling `check` (which raises to stop the ServerApp) before
    every exchange with the nodes and at every pull while it waits for replies; it wakes the
    engine when it pushes and is woken by it when a reply is stored (`prompt_engine_loops`).
    Everything else is Flower's grid."""

    def __init__(self, grid: Any, check: Callable[[], None]) -> None:
        self._grid, self._check = grid, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        pushed = self._grid.push_messages(*args, **kwargs)
        ENGINE_WAKEUPS.pushed.set()
        return pushed

    def pull_messages(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._grid.pull_messages(*args, **kwargs)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Flower's InMemoryGrid.send_and_receive (push, then pull until every reply is in or
        `timeout`), checking at every pull (replies may never come once the run's actors are
        gone), and pulling again when the engine stores a reply, or after `pull_interval`."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            self._check()
            ENGINE_WAKEUPS.replied.clear()  # before the pull: a reply stored after it wakes the wait below
            arrived = list(self._grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if waiting:
                ENGINE_WAKEUPS.replied.wait(self._grid.pull_interval)
        self._check()  # replies that came back because the run's actors were killed are not used
        return replies


def run_engine(
    server_app: Any, run_config: Mapping[str, Any], num_supernodes: int, client_resources: Mapping[str, float],
    app_dir: Path, client_app: str,
) -> None:
    """What `flwr-simulation` does with a run the SuperLink hands it, minus the SuperLink: a new
    run id, the run config fused from `app_dir`'s pyproject.toml and `run_config`, the ServerApp
    `server_app` and the ClientApp `client_app` ("module:attribute") in Flower's engine."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    prompt_engine_loops()
    run = Run.create_empty(run_id=secrets.randbits(63))
    run.override_config = dict(run_config)
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(app_dir, dict(run_config)))
    _run_simulation(
        num_supernodes=num_supernodes, exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        server_app=server_app, client_app_attr=client_app,
        backend_config={"client_resources": dict(client_resources)},
        app_dir=str(app_dir), run=run, server_app_context=context, is_app=True,
    )


# Ray's `ray start`, run with its swap of 127.0.0.1 for the outward address left out
_RAY_START_ON_LOOPBACK = ("import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
                          "from ray.scripts.scripts import main; main()")
RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_worker_node_on_loopback(
    head_address: str, temp_dir: str, num_cpus: int, resources: Mapping[str, float], env: Mapping[str, str],
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `ray start --block` for a worker node that joins the head at
    `head_address` (127.0.0.1:PORT) on this machine, every socket of it on 127.0.0.1: a second node
    of a local cluster (tests/test_simulation.py). Ray binds loopback only when its node address
    is literally 127.0.0.1; the switch that keeps it so (RAY_LOOPBACK_SWITCH = 0, which the head
    and its drivers use) also makes `ray start` refuse to add a node, so this node runs without
    the switch and with `ray start`'s own swap of 127.0.0.1 left out. On separate hosts none of
    this is needed: each node's address is a real one."""
    argv = [
        sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", "--block", f"--address={head_address}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--resources={json.dumps(dict(resources))}",
        "--disable-usage-stats", f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0",
    ]
    return argv, {key: value for key, value in env.items() if key != RAY_LOOPBACK_SWITCH}


# ---------------------------------------------------------------- Flower's SecAgg+


@dataclass(frozen=True)
class SecureSumSettings:
    """SecAggPlusWorkflow's parameters (docs/PRIVACY.md, "Secure aggregation")."""

    threshold: float  # the reconstruction threshold, as a share of the sampled merchants (Flower rounds it, at least 2)
    clipping_range: float  # every coordinate is clipped to [-clipping_range, clipping_range] ...
    quantization_range: int  # ... and mapped to integers in [0, quantization_range] by stochastic rounding
    modulus_range: int  # masks and sums live modulo this (2^32 at most in Flower 1.42)
    timeout: float | None


@dataclass
class SecureMean:
    """What one SecAgg+ exchange gave the server: the mean of the contributors' vectors
    (dequantized; None when the protocol halted), who contributed, the threshold the round
    announced, and every stage's replies (setup, share keys, collect masked vectors, unmask)."""

    mean: list[Any] | None
    contributors: list[int]
    threshold: int | None
    stage_replies: list[list[Message]]


class _StageRecorder:
    """The grid, recording each exchange's replies and the threshold the setup stage announces."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.replies: list[list[Message]] = []
        self.threshold: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

        messages = list(messages)
        configs = messages[0].content.config_records[RECORD_KEY_CONFIGS] if messages else {}
        if configs.get(Key.STAGE) == Stage.SETUP:  # every setup message carries the same configuration
            self.threshold = int(configs[Key.THRESHOLD])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.append(replies)
        return replies


def secure_mean(
    grid: Any, context: Any, server_round: int, node_ids: list[int], vectors: list[Any], config: Mapping[str, Any],
    settings: SecureSumSettings,
) -> SecureMean:
    """One round of Flower's SecAggPlusWorkflow over `node_ids`: each is sent `vectors` (the
    global parameters) and `config` as a legacy FitIns; each answers with a masked, quantized
    vector (every merchant weighs the same: num_examples = max_weight = 1); the server learns
    the mean of the vectors of the nodes that got to the unmasking, and nothing else."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
    from flwr.server import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    parameters = ndarrays_to_parameters(list(vectors))
    fit_ins = FitIns(parameters, dict(config))
    strategy = _fit_only_strategy(node_ids, fit_ins)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: parameters_to_arrayrecord(parameters, keep_input=True)})
    legacy = LegacyContext(context=type(context)(run_id=context.run_id, node_id=context.node_id, node_config={}, state=state,
                                                 run_config=dict(context.run_config)), strategy=strategy)
    recorder = _StageRecorder(grid)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=settings.threshold, max_weight=1.0, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, modulus_range=settings.modulus_range, timeout=settings.timeout,
    )
    workflow(recorder, legacy)  # type: ignore[arg-type]  # a Grid in all the workflow uses of one
    mean, contributors = strategy.aggregated
    return SecureMean(mean, contributors, recorder.threshold, recorder.replies)


def _fit_only_strategy(node_ids: list[int], fit_ins: Any) -> Any:
    """A legacy Strategy that asks exactly `node_ids` with `fit_ins` and keeps what the workflow
    hands its aggregate_fit (every result carries the unmasked mean); nothing else is used."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy

    class _Node(ClientProxy):
        """A legacy proxy is abstract over the legacy client calls; the workflow reads only its
        node_id and talks to the node through the grid, so none of these is ever called."""

        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def fit(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def reconnect(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    class _FitOnly(Strategy):
        def __init__(self) -> None:
            self.aggregated: tuple[list[Any] | None, list[int]] = (None, [])

        def initialize_parameters(self, client_manager: Any) -> Any:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            return [(_Node(node_id), fit_ins) for node_id in node_ids]

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            if results:
                self.aggregated = (parameters_to_ndarrays(results[0][1].parameters), [proxy.node_id for proxy, _ in results])
            return None, {}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            return []

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> Any:
            return None

    return _FitOnly()


def masked_vector(msg: Message) -> list[Any]:
    """The masked vector a SecAgg+ collect-stage reply carries, as the server receives it."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    return [bytes_to_ndarray(b) for b in msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]  # type: ignore[arg-type, union-attr]


def is_secure_aggregation(msg: Message) -> bool:
    """A training message of Flower's SecAgg+ protocol (any stage)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in msg.content.config_records


def secaggplus(msg: Message, context: Any, call_next: Callable[[Message, Any], Message]) -> Message:
    """Flower's secaggplus_mod: `call_next` runs only at the stage that collects masked vectors."""
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


def is_collect_stage(msg: Message) -> bool:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    return msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS


def secure_threshold(context: Any) -> tuple[int, int]:
    """(reconstruction threshold, merchants sampled) of this node's current SecAgg+ round, as its
    own mod stored them at the setup stage: the values its mod enforces (it sends no share for
    an unmasking with fewer live neighbours than the threshold)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = context.state.config_records[RECORD_KEY_STATE]
    return int(state["threshold"]), int(state["sample_num"])


def fit_instruction(msg: Message) -> tuple[list[Any], dict[str, Any]]:
    """The legacy FitIns a SecAgg+ collect message carries: (parameters as arrays, config)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    fit_ins = recorddict_to_fitins(msg.content, keep_input=True)
    return parameters_to_ndarrays(fit_ins.parameters), dict(fit_ins.config)


def add_fit_result(content: Any, vectors: list[Any]) -> None:
    """Add to `content` the legacy FitRes the mod masks: `vectors`, with weight 1 (every
    merchant weighs the same; nothing about its size leaves)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(vectors)), num_examples=1, metrics={})
    legacy = fitres_to_recorddict(fit_res, keep_input=False)
    for name, array_record in legacy.array_records.items():
        content.array_records[name] = array_record
    for name, metric_record in legacy.metric_records.items():
        content.metric_records[name] = metric_record
    for name, config_record in legacy.config_records.items():
        content.config_records[name] = config_record


# --- a deployed SuperNode: prompt polling, Flower's entry points run in our processes ---

CLIENTAPP_COMMAND = "flwr-clientapp"  # the program SuperExec starts, by name on PATH, for each message
SUPEREXEC_COMMAND = "flower-superexec"  # the program a SuperNode starts, by name on PATH, once
# what every ClientApp process imports before it reads its message: Flower's runtime and the
# scientific stack; the app's own modules are not among them, they load from the received FAB
CLIENTAPP_PRELOAD = ("flwr.supernode.cli", "flwr.supernode.runtime.run_clientapp", "httpx", "httpcore", "numpy", "scipy.sparse",
                     "scipy.linalg", "scipy.special", "scipy.stats", "pydantic", "yaml")


class _PromptSleep:
    """Stands in for the `time` module in Flower's SuperNode loop: its 3 s wait after an empty pull
    becomes one that ends `first` seconds after that pull began, that interval growing by `growth`
    per empty pull in a row, up to the 3 s (a pull the SuperLink held, deploy/held_pulls.py, counts
    towards it: after one, the next follows at once); its 0.5 s waits for the ClientApp's reply
    (and for the reply's objects) become `local_wait`: those look at the SuperNode's own state in
    this process, not at the SuperLink, so looking often costs a few microseconds a look, and a
    reply leaves as soon as it is there. With `stored` (`wake_on_clientapp_stores`), such a wait
    also ends the moment the ClientApp stores its reply or an object of it. Every other name is
    time's."""

    def __init__(self, first: float, growth: float, local_wait: float, stored: threading.Event | None = None) -> None:
        self.first, self.growth, self.local_wait, self.stored = first, growth, local_wait, stored
        self.idle_streak, self.woke = 0, time.monotonic()
        self.local_streak, self.local_woke = 0, self.woke

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds < 3.0:
            # Flower waits this way only with a message in hand (its ClientApp's reply, the
            # objects to push): the next empty pulls start a new streak, however fast the message went
            self.idle_streak = 0
            # a long ClientApp run (or objects that never come) is looked for less often, up to
            # `first` apart: 20 looks a second at most
            if time.monotonic() - self.local_woke > 2 * self.first:  # longer than any look: a new wait
                self.local_streak = 0
            wait = min(seconds, self.first, self.local_wait * 1.1**self.local_streak)
            if self.stored is None:
                time.sleep(wait)
            elif self.stored.wait(wait):  # cleared before Flower looks again: a store after the look wakes the next wait
                self.stored.clear()
            self.local_streak += 1
            self.local_woke = time.monotonic()
            return
        # the empty pull began when the last wait ended (after a message: once its reply was pushed)
        pulling = time.monotonic() - max(self.woke, self.local_woke)
        time.sleep(max(0.0, min(seconds, self.first * self.growth**self.idle_streak) - pulling))
        self.idle_streak += 1
        self.woke = time.monotonic()


def prompt_supernode_polling(first: float = 0.05, growth: float = 1.15, local_wait: float = 0.005) -> None:
    """Shorten the idle waits of the SuperNode loop in this process (before `run_flower_command`),
    and end its waits for a ClientApp's reply when the reply is stored."""
    module = importlib.import_module(_SUPERNODE)
    module.time = _PromptSleep(first, growth, local_wait, stored=wake_on_clientapp_stores())  # type: ignore[attr-defined]


_CLIENTAPP_STORED = threading.Event()


def wake_on_clientapp_stores() -> threading.Event:
    """In this (SuperNode) process: the Event set each time a ClientApp, through the SuperNode's
    Runtime API, stores a message (its reply) or an object of one in the SuperNode's state (one
    Event per process, whoever asks for it)."""
    stored = _CLIENTAPP_STORED
    state = resolve(Pinned(_NODESTATE, "InMemoryNodeState"))
    for name in ("store_message_and_object_tree", "store_object"):
        flowers = resolve(Pinned(_NODESTATE, f"InMemoryNodeState.{name}"))

        def store_and_wake(self: Any, *args: Any, _flowers: Callable[..., Any] = flowers, **kwargs: Any) -> Any:
            try:
                return _flowers(self, *args, **kwargs)
            finally:
                stored.set()

        _stand_in(state, name, store_and_wake)
    return stored


class _ReplacedSleep:
    """Stands in for the `time` module in one of Flower's loops: its `sleep` is `wait`; every
    other name is time's."""

    def __init__(self, wait: Callable[[float], None]) -> None:
        self.sleep = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def notify_stored_messages(notify: Callable[[], None]) -> None:
    """In this (SuperNode) process, `notify()` each time Flower's SuperNode loop has pulled a
    message and stored it with its task, objects and all (before `run_flower_command`)."""
    module = importlib.import_module(_SUPERNODE)
    pull_and_store = module._pull_and_store_message

    def pull_store_and_notify(*args: Any, **kwargs: Any) -> int | None:
        run_id: int | None = pull_and_store(*args, **kwargs)
        if run_id is not None:
            notify()
        return run_id

    module._pull_and_store_message = pull_store_and_notify  # type: ignore[attr-defined]


class _HandingOver:
    """Stands in for the `subprocess` module in Flower's SubprocessExecutor: a `flwr-clientapp`
    run goes to `hand_over(arguments, quiet)` instead of a new process when that returns True;
    everything else is subprocess's. Flower starts the process and keeps nothing of it (PINNED)."""

    def __init__(self, hand_over: Callable[[list[str], bool], bool]) -> None:
        self._hand_over = hand_over

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, args: list[str], **kwargs: Any) -> Any:
        quiet = kwargs == {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if args and args[0] == CLIENTAPP_COMMAND and (quiet or not kwargs) and self._hand_over(list(args[1:]), quiet):
            return None
        return subprocess.Popen(args, **kwargs)


def launch_clientapps_with(hand_over: Callable[[list[str], bool], bool]) -> None:
    """In this (SuperExec) process, a ClientApp run Flower's executor would start as a process is
    first offered to `hand_over(arguments, quiet)`, which takes it by returning True
    (deploy.warm_clientapp.hand_over); a run it does not take starts as Flower starts it."""
    module = importlib.import_module(_SUBPROCESS_EXECUTOR)
    module.subprocess = _HandingOver(hand_over)  # type: ignore[attr-defined]


def superexec_waits_with(wait: Callable[[float], None]) -> None:
    """In this (SuperExec) process, the SuperExec loop's pause between two looks for work
    (FLWR_SUPEREXEC_TASK_POLL_INTERVAL) is `wait(seconds)`, which may end it early."""
    module = importlib.import_module(_SUPEREXEC_LOOP)
    module.time = _ReplacedSleep(wait)  # type: ignore[attr-defined]


def skip_unsent_telemetry() -> None:
    """In this process (and those forked from it later): with Flower's usage reports off
    (FLWR_TELEMETRY_ENABLED=0, which deploy/__init__.py sets unless told otherwise) and not
    logged, Flower does not build the report it would not send. Building one reads the platform
    and runs `file` on the Python binary (platform.architecture), in a thread, twice in every
    ClientApp process: a few milliseconds of CPU per message for nothing."""
    module = importlib.import_module(_TELEMETRY)
    if module.FLWR_TELEMETRY_ENABLED != "1" and module.FLWR_TELEMETRY_LOGGING != "1":
        module.create_event = lambda event_type, event_details=None: "disabled"  # type: ignore[attr-defined]  # what it returns unsent


def prompt_object_pulls(first: float = 0.01, longest: float = 1.0) -> None:
    """In this process, Flower's pulls of a message's objects retry an object not there yet after
    `first` seconds, doubling up to `longest` (Flower: 1 s doubling up to 10 s). A ClientApp
    started promptly asks for its message while the SuperNode is still fetching it, and lost
    1 + 2 s to the backoff; a ServerApp pulling replies the same."""
    module = importlib.import_module(_INFLATABLE)
    for function in (module.pull_objects, module.pull_and_inflate_object_from_tree):
        defaults = dict(function.__kwdefaults__ or {})
        defaults.update(initial_backoff=first, backoff_cap=longest)
        function.__kwdefaults__ = defaults


def install_each_fab_once(record_dir: Path, on_use: Callable[[str, Path], None] | None = None) -> None:
    """In this process (and the ClientApps forked from it), a FAB whose exact bytes were installed
    and verified before is not unpacked again: Flower unzips and re-verifies the FAB for every
    message (0.2-0.3 s, and the app's modules then recompile). Keyed by the SHA-256 of the FAB's
    bytes; the record holds the path Flower installed it to, used only while that path exists.
    The installed app is compiled to bytecode once, when it is installed: a ClientApp otherwise
    compiles the app's modules from source on every message where Python does not write
    bytecode (PYTHONDONTWRITEBYTECODE, a read-only home), about 80 ms of CPU a message.
    `on_use(sha256, path)`: told which FAB the message runs, before Flower loads its app."""
    module = importlib.import_module(_RUN_CLIENTAPP)
    install = module.install_from_fab

    def install_once(fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        record = record_dir / hashlib.sha256(content).hexdigest()
        if install_dir is None and record.is_file():
            installed = Path(record.read_text())
            if installed.is_dir():
                if on_use is not None:
                    on_use(record.name, installed)
                return installed
        installed = Path(install(fab_file, install_dir, skip_prompt))
        # py_compile writes the bytecode whatever sys.dont_write_bytecode says; a failure only costs speed
        compileall.compile_dir(str(installed), quiet=2)
        if install_dir is None:
            record_dir.mkdir(parents=True, exist_ok=True)
            record.write_text(str(installed))
            if on_use is not None:
                on_use(record.name, installed)
        return installed

    module.install_from_fab = install_once  # type: ignore[attr-defined]


def timestamp_flower_logs() -> None:
    """Flower's console log lines in this process carry the time of day (Flower shows it only at
    DEBUG level): a merchant's SuperNode log then says when each message came and went."""
    for handler in logging.getLogger(FLOWER_LOGGER).handlers:
        if hasattr(handler, "timestamps"):
            handler.timestamps = True


# --- a deployed SuperLink: its HTTP layers, each only under the API it serves ---

# Flower 1.42's SuperLink serves its three APIs from one FastAPI app and passes every request,
# a SuperNode's pull as much as `flwr run`, through all eight of its BaseHTTPMiddleware layers
# (flwr/superlink/main.py `_get_middleware`); a BaseHTTPMiddleware layer costs a task group and
# a re-streamed response per request even when it only passes the request on. These six act
# only on the paths under their prefix and pass every other request straight on (PINNED checks
# the test each one makes), so they are skipped outside it; the error translator and the
# protobuf translation serve every API and stay as they are.
SUPERLINK_LAYER_SCOPES = {
    (_CONTROL_MIDDLEWARE, "ControlSensitiveResponseMiddleware"): "/v1/control/",
    (_CONTROL_MIDDLEWARE, "ControlAuthenticationMiddleware"): "/v1/control/",
    (_CONTROL_MIDDLEWARE, "ControlLicenseMiddleware"): "/v1/control/",
    (_CONTROL_MIDDLEWARE, "ControlEventLogMiddleware"): "/v1/control/",
    (_NODE_AUTH, "NodeAuthMiddleware"): "/v1/fleet/",
    (_FLEET_MIDDLEWARE, "FleetEventLogMiddleware"): "/v1/fleet/",
}


_URL_DROPS = frozenset("\t\r\n")


class PathScopedLayer:
    """An ASGI middleware `layer` that sees only the HTTP requests whose path starts with
    `prefix` (and the non-HTTP scopes, lifespan included, which a BaseHTTPMiddleware passes on
    itself); every other HTTP request goes straight to `app`."""

    def __init__(self, app: Any, layer: Any, prefix: str, layer_args: tuple[Any, ...] = (),
                 layer_kwargs: Mapping[str, Any] | None = None) -> None:
        self.app, self.prefix = app, prefix
        self.layer = layer(app, *layer_args, **dict(layer_kwargs or {}))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        # a layer reads Starlette's request.url.path, which drops tabs and line breaks from the
        # path and can read a leading "//" as a host: such paths meet the layer as before
        if path and not path.startswith(self.prefix) and not path.startswith("//") and not _URL_DROPS.intersection(path):
            await self.app(scope, receive, send)
        else:
            await self.layer(scope, receive, send)


def scoped_superlink_layers(layers: list[Any]) -> list[Any]:
    """Flower's SuperLink middleware list, in its order, each layer of SUPERLINK_LAYER_SCOPES
    wrapped in a PathScopedLayer for its prefix; every other layer as it is."""
    from starlette.middleware import Middleware

    scopes = {resolve(Pinned(module, name)): prefix for (module, name), prefix in SUPERLINK_LAYER_SCOPES.items()}
    sensitive = resolve(Pinned(_CONTROL_MIDDLEWARE, "CONTROL_SENSITIVE_ROUTE_KEYS"))
    if any(not path.startswith("/v1/control/") for _, path in sensitive):
        raise RuntimeError("a sensitive Control route outside /v1/control/: the SuperLink's layers stay unscoped")
    return [Middleware(PathScopedLayer, layer=layer.cls, prefix=scopes[layer.cls], layer_args=tuple(layer.args),
                       layer_kwargs=dict(layer.kwargs)) if layer.cls in scopes else layer
            for layer in layers]


def scope_superlink_middleware(outermost: Sequence[Any] = ()) -> None:
    """In this (SuperLink) process, before `run_flower_command("flower-superlink", ...)`: the app
    Flower builds applies each of its API-specific HTTP layers only under that API's paths, and
    the `outermost` layers (Starlette Middleware entries) before all of Flower's."""
    module = importlib.import_module(_SUPERLINK_APP)
    flowers = _FLOWERS_BY_STAND_IN.get(module._get_middleware, module._get_middleware)  # called again: Flower's list, once
    _stand_in(module, "_get_middleware", lambda: [*outermost, *scoped_superlink_layers(flowers())])


# --- Flower's HTTP servers: a route's synchronous steps in the event loop's own thread ---

# the modules that hand a route's synchronous functions (Flower's handlers, FastAPI's
# dependencies) to anyio's worker threads, each through its own name for Starlette's
# `run_in_threadpool` (`run_handlers_inline`)
THREADPOOL_USERS = ("fastapi.dependencies.utils", "fastapi.routing", "flwr.supercore.protobuf.routing",
                    # the Fleet API's check of a SuperNode's signature, before its handler
                    _NODE_AUTH)
# the routes of Flower's message exchange, whose handlers run in the event loop (`InlineHandlers`):
# the SuperNodes' Fleet API, and the Runtime API of the ServerApp and the ClientApps; operations on
# the state, which wait for nothing else (a SQLite state's lock aside). The Runtime API's agent,
# model and connector routes (one refreshes a connector's credentials over the network) keep
# their worker threads, as does the Control API (its log streams wait between looks)
FLEET_EXCHANGE_ROUTES = tuple(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages", "push-messages",
    "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received"))
RUNTIME_EXCHANGE_ROUTES = tuple(f"/v1/runtime/{name}" for name in (
    "send-task-heartbeat", "pull-task-input", "push-task-output", "push-object", "pull-object",
    "confirm-message-received", "push-logs", "push-messages", "pull-messages", "get-nodes"))
# a SuperNode's Runtime API also hands its SuperExec a task in the event loop: there acquire-task
# claims one from the state; the SuperLink's first starts its due automations, which may fetch a
# FAB over the network, and keeps its worker thread
SUPERNODE_RUNTIME_ROUTES = (*RUNTIME_EXCHANGE_ROUTES, "/v1/runtime/acquire-task")
_IN_EVENT_LOOP: ContextVar[bool] = ContextVar("fedads_handlers_in_event_loop", default=False)


class InlineHandlers:
    """An ASGI layer: an HTTP request to one of `paths` runs its route's synchronous functions in
    the event loop's thread (where `run_handlers_inline` is in force in the process); every other
    request, and every other scope, goes on as Flower runs it."""

    def __init__(self, app: Any, paths: Iterable[str]) -> None:
        self.app, self.paths = app, frozenset(paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        token = _IN_EVENT_LOOP.set(True)  # seen by the tasks the layers below start: they copy the context
        try:
            await self.app(scope, receive, send)
        finally:
            _IN_EVENT_LOOP.reset(token)


async def _here_or_in_threadpool(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if _IN_EVENT_LOOP.get():
        return func(*args, **kwargs)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(func, *args, **kwargs)


async def _dispatch_in_this_task(layer: Any, scope: Any, receive: Any, send: Any) -> None:
    """What Starlette's BaseHTTPMiddleware.__call__ does for one HTTP request, with `call_next`
    awaiting the app below in this task and buffering its response, instead of running it in a
    task of its own and streaming the response back through a memory stream (an anyio task
    group, two streams and a cancel scope per layer and request: about 0.2 ms of CPU each, against
    about 0.01 ms, `benchmarks/middleware_layers.py`). For unary routes only: the layer sees the
    response once the app below has written all of it. As in Starlette, the app below reads the
    body the layer read; an exception from it before its response reaches the layer's dispatch,
    one after is raised once the layer's response has been sent; no response is an error.
    Unlike Starlette: a background task of the response below runs before the layer's response
    goes out; an app below that waits on `receive()` after its response waits for the client to
    go (Starlette tells it at once); a ContextVar it sets without resetting reaches the layer.
    None of this can happen on the allowlisted routes, each a synchronous Flower handler that
    returns one protobuf message (tests/test_superlink_layers.py checks their kind)."""
    from starlette.middleware.base import _CachedRequest
    from starlette.responses import Response

    request = _CachedRequest(scope, receive)
    raised_after_response: list[Exception] = []

    async def call_next(_: Any) -> Any:
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def collect(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        try:
            await layer.app(scope, request.wrapped_receive, collect)
        except Exception as exc:
            if not start:
                raise
            raised_after_response.append(exc)
        if not start:
            raise RuntimeError("No response returned.")
        response = Response(b"".join(body), status_code=start["status"])
        response.raw_headers = list(start.get("headers", []))  # the app's own, its content-length included
        return response

    response = await layer.dispatch_func(request, call_next)
    await response(scope, request.wrapped_receive, send)
    if raised_after_response:
        raise raised_after_response[0]


def _base_http_middleware_call(starlettes: Callable[..., Any]) -> Callable[..., Any]:
    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _IN_EVENT_LOOP.get():
            await _dispatch_in_this_task(self, scope, receive, send)
        else:
            await starlettes(self, scope, receive, send)

    return __call__


def run_handlers_inline() -> None:
    """In this process, before Flower builds its HTTP app: under an InlineHandlers layer, a
    route's synchronous functions run where the request is, not in a worker thread, and each
    BaseHTTPMiddleware layer calls the layers below in the request's own task
    (`_dispatch_in_this_task`). Meant for unary routes that wait for nothing but the state
    (FLEET_EXCHANGE_ROUTES, RUNTIME_EXCHANGE_ROUTES, SUPERNODE_RUNTIME_ROUTES): each hand-over to a
    worker and back costs a queue, a thread's wake-up and two passes of the GIL, which on a busy
    machine waits its turn (docs/BENCHMARKS.md, "Deployment": a 3-merchant deployed round on two
    cores about a sixth shorter without them), and each layer's task and streams cost more CPU
    than the layer's own work. The price: a handler that waits for a SQLite state's lock (held by
    a Control API request, up to Flower's busy timeout) holds up every request of the process
    meanwhile, not only its own. A module that no longer has the name keeps its worker threads
    (tests/test_flower_internals.py checks the pins)."""
    for name in THREADPOOL_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "run_in_threadpool"):
            _stand_in(module, "run_in_threadpool", _here_or_in_threadpool)
    from starlette.middleware.base import BaseHTTPMiddleware

    starlettes = resolve(Pinned("starlette.middleware.base", "BaseHTTPMiddleware.__call__"))
    if BaseHTTPMiddleware.__call__ is starlettes:  # once per process
        _stand_in(BaseHTTPMiddleware, "__call__", _base_http_middleware_call(starlettes))


def run_supernode_handlers_inline() -> None:
    """In this (SuperNode) process, before `run_flower_command("flower-supernode", ...)`: the
    handlers of the Runtime API its ClientApps call (pull a message, push a reply, on the
    SuperNode's state in memory) run in the event loop's thread (`run_handlers_inline`)."""
    run_handlers_inline()
    module = importlib.import_module("flwr.supernode.main")
    flowers = resolve(Pinned("flwr.supernode.main", "create_app"))  # Flower's, also when called again

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = flowers(*args, **kwargs)
        app.add_middleware(InlineHandlers, paths=SUPERNODE_RUNTIME_ROUTES)  # outermost
        return app

    _stand_in(module, "create_app", create_app)


@functools.cache
def _protobuf(module: str, name: str) -> Any:
    """A pinned protobuf message class, looked up once (every pull and push reads one)."""
    return resolve(Pinned(module, name))


class _PullRoutes:
    """Flower's routes for pulling and pushing messages, and what deploy.held_pulls reads in
    their protobuf bodies; a body that does not parse raises ValueError."""

    fleet_pull = "/v1/fleet/pull-messages"  # a SuperNode's pull of its next instruction
    fleet_push = "/v1/fleet/push-messages"  # a SuperNode's reply
    runtime_pull = "/v1/runtime/pull-messages"  # a ServerApp's pull of replies
    runtime_push = "/v1/runtime/push-messages"  # a ServerApp's instructions

    @staticmethod
    def _parse(name: tuple[str, str], body: bytes) -> Any:
        from google.protobuf.message import DecodeError

        try:
            return _protobuf(*name).FromString(body)
        except DecodeError as exc:
            raise ValueError(f"not a {name[1]}") from exc

    def pulling_node(self, body: bytes) -> int:
        return int(self._parse(("flwr.proto.fleet_pb2", "PullMessagesRequest"), body).node.node_id)

    def nothing_pulled(self, path: str, body: bytes) -> bool:
        if path == self.fleet_pull:
            response = self._parse(("flwr.proto.fleet_pb2", "PullMessagesResponse"), body)
            return not response.messages_list and not response.HasField("reconnect")
        return not self._parse(("flwr.proto.runtime_pb2", "PullAppMessagesResponse"), body).messages_list

    def destinations(self, body: bytes) -> set[int]:
        pushed = self._parse(("flwr.proto.runtime_pb2", "PushAppMessagesRequest"), body)
        return {int(message.metadata.dst_node_id) for message in pushed.messages_list}


PULL_ROUTES = _PullRoutes()


# Flower's commands that run in processes of ours: command name -> (module, its entry point there)
FLOWER_COMMANDS = {"flower-superlink": ("flwr.superlink.cli", "flower_superlink"),
                   "flower-supernode": ("flwr.supernode.cli", "flower_supernode"),
                   CLIENTAPP_COMMAND: ("flwr.supernode.cli", "flwr_clientapp"),
                   SUPEREXEC_COMMAND: ("flwr.supercore.cli", "flower_superexec")}


class _TaskStopped(BaseException):
    """SIGINT to a ClientApp run in this process (`run_clientapp_here`): Flower stopping its task."""


def clientapp_runs_here(argv: list[str]) -> bool:
    """Whether `run_clientapp_here` can run a ClientApp started as `flwr-clientapp ARGV` (reads
    nothing from standard input): not when it asks Flower to install the app's dependencies for
    the run (a virtual environment of its own, which only a process of its own can use)."""
    if "-h" in argv or "--help" in argv:  # Flower's help, printed where the run's output goes
        return False
    cli = importlib.import_module(_CLIENTAPP_CLI)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a refusal is printed by the process that runs it
            args = cli._parse_args_run_flwr_clientapp().parse_args(argv)
    except SystemExit:
        return False
    return not args.runtime_dependency_install


def run_clientapp_here(argv: list[str]) -> int:
    """Flower's `flwr-clientapp ARGV` run in this process, which goes on afterwards: the exit
    status Flower's process would end with (0, or 1 when the task failed). Flower 1.42's
    run_clientapp is written for a process of its own: it watches its parent, installs SIGINT
    and SIGTERM handlers, and ends in flwr_exit (exit handlers, a force-exit timer, sys.exit).
    This is its body without those, in the same order (the steps are Flower's own functions in
    its run_clientapp module, this process's stand-ins included): the task token from standard
    input or the arguments, the task's heartbeat, its message, the FAB, the app, the reply, then
    the task's output and status. An exception the app raises is a failed task, reported as
    Flower reports it. Flower stops a task by SIGINT to its process (the task's heartbeat does,
    when the SuperNode no longer knows the task): here, for the run's length, SIGINT while the
    app runs ends the task as Flower's signal handler does (no reply; its status, failed, pushed;
    exit status 0) and leaves this process running; one after the app returned (a heartbeat
    that crossed the task's end) changes nothing. SystemExit (this process stopping) and the
    like leave at once, without the pushes. Must run in the main thread (signal handlers)."""
    cli = importlib.import_module(_CLIENTAPP_CLI)
    runtime = importlib.import_module(_RUN_CLIENTAPP)
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus

    runtime.event(runtime.EventType.FLWR_CLIENTAPP_RUN_ENTER)
    args = cli._parse_args_run_flwr_clientapp().parse_args(argv)
    token = cli.try_obtain_flwr_app_token(args)
    retry_invoker = runtime.make_simple_http_retry_invoker()
    client = runtime.RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=cli.validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        interceptors=[runtime.RuntimeTracingInterceptor(),
                      runtime.RuntimeVersionHttpInterceptor(component_name=CLIENTAPP_COMMAND),
                      runtime.RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker,
    )
    heartbeat = None
    message = reply = context = None
    sub_status, details, failed = SubStatus.FAILED, "ClientApp task failed due to unknown reason", False
    app_running = [True]

    def stop_the_task(signum: int, frame: Any) -> None:
        if app_running[0]:
            raise _TaskStopped

    previous_handler = signal.signal(signal.SIGINT, stop_the_task)
    try:
        heartbeat = runtime.HeartbeatSender(runtime.make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run, fab = runtime.pull_task_input(client)
        runtime.install_from_fab(fab.content, skip_prompt=True)
        load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        reply = load(run.fab_id, run.fab_version, fab.hash_str)(message=message, context=context)
        app_running[0] = False
        sub_status, details = SubStatus.COMPLETED, ""
    except _TaskStopped:
        app_running[0] = False
        reply, details = None, "Task stopped."
    except Exception as exc:  # what Flower's run_clientapp reports for it
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"
        if isinstance(exc, runtime.LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
        app_running[0] = False
        logging.getLogger(FLOWER_LOGGER).error("ClientApp raised an exception", exc_info=exc)
        sub_status, details, failed = SubStatus.FAILED, reason, True
        if message:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    except BaseException:  # this process stopping: its heartbeat thread (a daemon) ends with it, unjoined
        signal.signal(signal.SIGINT, previous_handler)
        retry_invoker.max_tries = 1
        raise
    try:
        if reply and context:
            try:
                runtime.push_message(client, reply, context)
            except Exception as exc:
                logging.getLogger(FLOWER_LOGGER).error("Failed to push reply message", exc_info=exc)
                failed = True
        retry_invoker.max_tries = 1  # as Flower's exit handler: the status is not worth a wait
        runtime.push_task_output(client=client, context=context, sub_status=sub_status, details=details)
    finally:
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()
        signal.signal(signal.SIGINT, previous_handler)
    runtime.event(runtime.EventType.FLWR_CLIENTAPP_RUN_LEAVE, {"exit_code": int(failed)})
    return 1 if failed else 0


def run_not_found_error() -> str:
    """What the `flwr` CLI's error message holds when the SuperLink does not know a run id
    (Flower's ApiErrorCode.RUN_ID_NOT_FOUND, as flwr.cli.utils prints an error's code): how
    the operator's tools tell "no such run" from a SuperLink that did not answer."""
    from flwr.supercore.error.base import ApiErrorCode

    return f"[code: {int(ApiErrorCode.RUN_ID_NOT_FOUND)}]"


def run_flower_command(command: str, argv: list[str]) -> None:
    """Flower's `command` (a key of FLOWER_COMMANDS), in this process, with `argv` as its arguments."""
    module, name = FLOWER_COMMANDS[command]
    entry_point = getattr(importlib.import_module(module), name)
    sys.argv = [command, *argv]
    entry_point()
