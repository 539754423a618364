"""IAM's SimulatePrincipalPolicy, answered by the evaluation the local AWS enforces (local_aws.evaluator) on the
policies it enforces (local_aws.identities), in IAM's query protocol.

What the request gives, as AWS documents it:
- ``PolicySourceArn``: a user (its policies and its groups'), a group or a role of this account; NoSuchEntity when
  there is none, InvalidInput for an ARN that names none of them (an assumed role's session, say).
- each of ``ActionNames`` on each of ``ResourceArns`` (none: ``*``): one EvaluationResult per action and resource
  type, named by the type's ARN format (``*`` for all resources), its decision the most restrictive over the
  resources, with one ResourceSpecificResult per resource when resources are named.
- ``ContextEntries``: the only context keys there are; AWS fills none in from the request itself. A condition on a
  key none gives fails, and the key is named in MissingContextValues.
- ``PolicyInputList``: more identity-based policies; ``PermissionsBoundaryPolicyInputList``: a permissions boundary
  (the local AWS enforces none of its own); ``ResourcePolicy``, with ``CallerArn`` (the principal it is weighed for;
  by default the source) and ``ResourceOwner`` (the account of a resource whose ARN names none).
- ``MaxItems`` and ``Marker`` page the results.
``PolicyExclusionList`` and ``ResourceHandlingOption`` (EC2's scenarios) are refused by name: the local AWS does not
evaluate them, and an answer that ignored them would be wrong.

Resource names are read literally, as AWS's simulator reads them: ``arn:aws:s3:::bucket/*`` is the object whose key
is ``*``, which ``arn:aws:s3:::bucket/*`` in a policy matches and ``arn:aws:s3:::bucket/prefix/*`` does not, and
``*`` alone is matched only by the statements on every resource. So each ``*`` of a name goes to the evaluator as a
character of the name (local_aws.evaluator.literal), and ``*`` alone as the action's ARN format with that character
in every place, the partition's included, which only a policy's ``*`` matches.

The caller is authorized by the gateway first, as any request: ``iam:SimulatePrincipalPolicy`` on the source's ARN.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import ipaddress
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from xml.sax.saxutils import escape

from local_aws import errors, sar
from local_aws.evaluator import LITERAL, Decision, Evaluator, EvaluatorError, literal
from local_aws.identities import Identities

NAMESPACE = "https://iam.amazonaws.com/doc/2010-05-08/"
DEFAULT_MAX_ITEMS, MAX_ITEMS = 100, 1000
_ENTITY = re.compile(r"arn:aws:iam::(\d{12}):(user|group|role)/(?:[\x21-\x7e]*/)?([\w+=,.@-]+)")
_OWNER = re.compile(r"(?:arn:aws:iam::)?(\d{12})(?::root)?")
_DECISIONS = {"Allowed": "allowed", "ExplicitlyDenied": "explicitDeny", "ImplicitlyDenied": "implicitDeny"}
_RESTRICTIVE = ("allowed", "implicitDeny", "explicitDeny")  # least to most: the resources' overall decision is the most
_SINGLE_TYPES = {"string", "numeric", "boolean", "ip", "binary", "date"}  # ContextKeyType's, each also as `...List`


class SimulationError(Exception):
    """A request IAM refuses: its status, code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def _invalid(message: str) -> SimulationError:
    return SimulationError(400, "InvalidInput", message)


def _missing(member: str) -> SimulationError:
    return SimulationError(
        400,
        "ValidationError",
        f"1 validation error detected: Value null at '{member[0].lower()}{member[1:]}' failed to satisfy constraint: "
        "Member must not be null",
    )


@dataclasses.dataclass(frozen=True)
class _Simulation:
    """What one SimulatePrincipalPolicy request asks, read and checked."""

    principal: str
    owner: str
    identity: list[dict]
    boundary: list[dict] | None
    resource_policy: dict | None
    actions: list[str]
    resources: list[str] | None
    context: dict[str, str | list[str]]
    max_items: int
    marker: int


class Simulator:
    def __init__(self, identities: Identities, evaluator: Evaluator):
        self.identities, self.evaluator = identities, evaluator

    def answer(self, params: Mapping[str, str]) -> tuple[int, list, bytes]:
        """The HTTP answer (status, headers, body) to a SimulatePrincipalPolicy request of query ``params``."""
        try:
            simulation = self._read(params)
            results = [result for action in simulation.actions for result in self._results(simulation, action)]
        except SimulationError as error:
            return errors.query_error(error.status, error.code, str(error))
        except EvaluatorError as error:
            # The evaluator checks each policy's grammar first ("policy.errors", with each fault): a policy that fails
            # is the caller's to mend, as IAM's InvalidInput says; anything else is IAM's own failure.
            if '"message":"policy.errors"' in str(error):
                return errors.query_error(400, "InvalidInput", f"A policy of the simulation is not valid: {error}")
            return errors.query_error(500, "PolicyEvaluation", str(error))
        end = simulation.marker + simulation.max_items
        output = {"EvaluationResults": results[simulation.marker : end], "IsTruncated": end < len(results)}
        if end < len(results):
            output["Marker"] = str(end)
        return _response("SimulatePrincipalPolicy", output)

    # -- the request ----------------------------------------------------------------------------------------------

    def _read(self, params: Mapping[str, str]) -> _Simulation:
        for unsupported in ("PolicyExclusionList", "ResourceHandlingOption"):
            if any(key == unsupported or key.startswith(f"{unsupported}.") for key in params):
                raise _invalid(f"{unsupported} is not supported by the local AWS")
        source = params.get("PolicySourceArn")
        if not source:
            raise _missing("PolicySourceArn")
        actions = _members(params, "ActionNames")
        if not actions:
            raise _missing("ActionNames")
        for action in actions:
            if sar.action(action) is None:
                raise _invalid(f"Action {action} is not a valid action: the Service Authorization Reference has none")
        kind, name, source_account = _entity(source)
        found = self.identities.entity_policies(kind, name) if source_account == self.identities.account else None
        if found is None or found[0] != source:
            raise SimulationError(404, "NoSuchEntity", f"The {kind} with name {name} cannot be found.")
        identity = found[1] + [
            {"name": f"PolicyInputList.{number}", "policy": _policy(document, "PolicyInputList")}
            for number, document in enumerate(_members(params, "PolicyInputList"), start=1)
        ]
        boundaries = _members(params, "PermissionsBoundaryPolicyInputList")
        boundary = [
            {"name": f"PermissionsBoundaryPolicyInputList.{number}", "policy": _policy(document, "boundary")}
            for number, document in enumerate(boundaries, start=1)
        ]
        caller = params.get("CallerArn") or source
        caller_account = _entity(caller)[2]
        owner = params.get("ResourceOwner")
        if owner is not None and not (match := _OWNER.fullmatch(owner)):
            raise _invalid(f"'{owner}' is not a valid as a Resource Owner.")
        resource_policy = params.get("ResourcePolicy")
        return _Simulation(
            principal=caller,
            owner=match[1] if owner is not None else caller_account,
            identity=identity,
            boundary=boundary or None,
            resource_policy=_policy(resource_policy, "ResourcePolicy") if resource_policy is not None else None,
            actions=actions,
            resources=_members(params, "ResourceArns") or None,
            context=_context(params),
            max_items=_max_items(params.get("MaxItems")),
            marker=_marker(params.get("Marker")),
        )

    # -- the results ----------------------------------------------------------------------------------------------

    def _results(self, simulation: _Simulation, action: str) -> list[dict]:
        """The action's results: one for each resource type its resources are of, in the order they first come."""
        groups: dict[str, list[tuple[str, Decision]]] = {}
        for resource in simulation.resources or ["*"]:
            read_as, template = _read_as(action, resource)
            decision = self._evaluate(simulation, action, resource, read_as)
            groups.setdefault(template, []).append((resource, decision))
        results = []
        for template, decided in groups.items():
            specific = [_specific(resource, decision, simulation) for resource, decision in decided]
            overall = max((s["EvalResourceDecision"] for s in specific), key=_RESTRICTIVE.index)
            result = {
                "EvalActionName": action,
                "EvalResourceName": template,
                "EvalDecision": overall,
                # The statements that made the overall decision, on whichever resource; the keys any one lacked.
                "MatchedStatements": _unique(
                    statement
                    for s in specific
                    if s["EvalResourceDecision"] == overall
                    for statement in s["MatchedStatements"]
                ),
                "MissingContextValues": sorted({key for s in specific for key in s["MissingContextValues"]}),
            }
            if simulation.boundary is not None:
                result["PermissionsBoundaryDecisionDetail"] = {
                    "AllowedByPermissionsBoundary": all(
                        s["PermissionsBoundaryDecisionDetail"]["AllowedByPermissionsBoundary"] for s in specific
                    )
                }
            if simulation.resources is not None:
                result["ResourceSpecificResults"] = specific
            results.append(result)
        return results

    def _evaluate(self, simulation: _Simulation, action: str, resource: str, read_as: str) -> Decision:
        arn_account = resource.split(":")[4] if resource.count(":") >= 5 else ""
        request = {
            "principal": simulation.principal,
            "action": action,
            "resource": {"resource": read_as, "accountId": arn_account if arn_account.isdigit() else simulation.owner},
            "contextVariables": simulation.context,
        }
        question = {"request": request, "identityPolicies": simulation.identity}
        if simulation.boundary is not None:
            question["permissionBoundaryPolicies"] = simulation.boundary
        if simulation.resource_policy is not None:
            question["resourcePolicy"] = simulation.resource_policy
        return self.evaluator.evaluate(question)


def _specific(resource: str, decision: Decision, simulation: _Simulation) -> dict:
    """One resource's ResourceSpecificResult: its decision, the statements that made it, the keys it lacked."""
    answer = _DECISIONS[decision.result]
    if answer == "allowed":
        decisive = decision.grants
    elif answer == "explicitDeny":
        decisive = tuple(denial for denial in decision.denials if denial["denialType"] == "Explicit")
    else:
        decisive = ()
    result = {
        "EvalResourceName": resource,
        "EvalResourceDecision": answer,
        # AWS names the statements of identity-based and resource-based policies only.
        "MatchedStatements": _unique(
            _statement(entry) for entry in decisive if entry["policyType"] in ("identity", "resource")
        ),
        "MissingContextValues": list(decision.missing_context_keys),
    }
    if simulation.boundary is not None:
        result["PermissionsBoundaryDecisionDetail"] = {"AllowedByPermissionsBoundary": decision.boundary == "Allowed"}
    return result


def _statement(entry: Mapping) -> dict:
    """The Statement (SourcePolicyId, SourcePolicyType) of one of the evaluator's grants or explicit denials."""
    if entry["policyType"] == "resource":
        return {"SourcePolicyId": "ResourcePolicy", "SourcePolicyType": "resource"}
    identifier = entry.get("policyIdentifier", "")
    if identifier.startswith("arn:"):  # a managed policy: AWS's own are in the account `aws`
        return {
            "SourcePolicyId": identifier,
            "SourcePolicyType": "aws-managed" if identifier.split(":")[4] == "aws" else "user-managed",
        }
    if identifier.startswith("PolicyInputList."):
        return {"SourcePolicyId": identifier, "SourcePolicyType": "none"}
    kind, _, policy = identifier.split("/", 2)  # an inline policy: `user/NAME/POLICY` (local_aws.identities)
    return {"SourcePolicyId": policy, "SourcePolicyType": kind}


def _unique(statements: Iterable[dict]) -> list[dict]:
    unique: list[dict] = []
    for statement in statements:
        if statement not in unique:
            unique.append(statement)
    return unique


def _read_as(action: str, resource: str) -> tuple[str, str]:
    """The resource as the evaluator is to read it (module docstring), and the EvalResourceName of its type: the
    ARN format it fits, or ``*`` (for ``*`` itself, and for a name of no type the action takes, which only the
    statements on every resource match)."""
    formats = sar.arn_formats(action)
    if not formats:  # an action on no resource type is authorized on `*` alone
        return "*", "*"
    if resource != "*":
        for arn_format, _ in formats:
            if sar.matches(arn_format, resource):
                return literal(resource), arn_format
    arn_format = next((arn_format for arn_format, required in formats if required), formats[0][0])
    return sar.fill(arn_format, {variable: LITERAL for variable in sar.variables(arn_format)}), "*"


# -- reading the query ---------------------------------------------------------------------------------------------


def _members(params: Mapping[str, str], name: str) -> list[str]:
    """A query list (``Name.member.N``), in its members' order."""
    found = []
    for key, value in params.items():
        if match := re.fullmatch(rf"{name}\.member\.(\d+)", key):
            found.append((int(match[1]), value))
    return [value for _, value in sorted(found)]


def _entity(arn: str) -> tuple[str, str, str]:
    """(kind, name, account) of an IAM user's, group's or role's ARN; InvalidInput for any other."""
    match = _ENTITY.fullmatch(arn)
    if match is None:
        raise _invalid(f"Invalid Entity Arn: {arn}")
    return match[2], match[3], match[1]


def _policy(document: str, what: str) -> dict:
    try:
        policy = json.loads(document)
    except ValueError as error:
        raise _invalid(f"The {what} document is not valid JSON: {error}") from None
    if not isinstance(policy, dict):
        raise _invalid(f"The {what} document is not a JSON object")
    return policy


def _context(params: Mapping[str, str]) -> dict[str, str | list[str]]:
    """The ContextEntries, each key with its values (one value for a single-valued type), checked against their
    ContextKeyType."""
    entries: dict[int, dict] = {}
    for key, value in params.items():
        match = re.fullmatch(
            r"ContextEntries\.member\.(\d+)\.(ContextKeyName|ContextKeyType|ContextKeyValues)"
            r"(?:\.member\.(\d+))?",
            key,
        )
        if match is None:
            continue
        entry = entries.setdefault(int(match[1]), {"values": []})
        if match[2] == "ContextKeyValues":
            entry["values"].append((int(match[3] or 0), value))
        else:
            entry[match[2]] = value
    context: dict[str, str | list[str]] = {}
    for _, entry in sorted(entries.items()):
        name, kind = entry.get("ContextKeyName"), entry.get("ContextKeyType")
        values = [value for _, value in sorted(entry["values"])]
        if not name:
            raise _invalid("A context entry has no ContextKeyName")
        if kind is None:
            raise _invalid(f"The context entry {name} has no ContextKeyType")
        base = kind.removesuffix("List")
        if base not in _SINGLE_TYPES:
            raise _invalid(f"ContextKeyType {kind} of {name} is not a type of ContextKeyTypeEnum")
        if kind in _SINGLE_TYPES and len(values) != 1:
            raise _invalid(f"The context key {name} of type {kind} takes one value, not {len(values)}")
        for value in values:
            if not _fits(base, value):
                raise _invalid(f"{value!r} is not a valid {base} value for the context key {name}")
        context[name] = values[0] if kind in _SINGLE_TYPES else values
    return context


def _fits(kind: str, value: str) -> bool:
    """Whether ``value`` is one of the ContextKeyType ``kind`` (its single-valued form)."""
    try:
        if kind == "numeric":
            float(value)
        elif kind == "boolean":
            return value.lower() in ("true", "false")
        elif kind == "ip":
            ipaddress.ip_network(value, strict=False)
        elif kind == "binary":
            base64.b64decode(value, validate=True)
        elif kind == "date" and not value.isdigit():  # an ISO 8601 time, or seconds since the epoch
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _max_items(value: str | None) -> int:
    if value is None:
        return DEFAULT_MAX_ITEMS
    if not value.isdigit() or not 1 <= int(value) <= MAX_ITEMS:
        raise _invalid(f"MaxItems {value} is not between 1 and {MAX_ITEMS}")
    return int(value)


def _marker(value: str | None) -> int:
    """Where a page starts: the Marker an earlier answer gave (the index of its first result)."""
    if value is None:
        return 0
    if not value.isdigit():
        raise _invalid(f"Invalid Marker: {value}")
    return int(value)


# -- the answer ----------------------------------------------------------------------------------------------------


def _response(operation: str, output: dict) -> tuple[int, list, bytes]:
    """``output`` in IAM's query protocol, as botocore's model of ``operation`` shapes it."""
    shape = _iam_model().operation_model(operation).output_shape
    request_id = str(uuid.uuid4())
    body = (
        f'<{operation}Response xmlns="{NAMESPACE}"><{operation}Result>{_xml(shape, output)}</{operation}Result>'
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></{operation}Response>"
    )
    return 200, [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)], body.encode()


@functools.cache
def _iam_model():
    import botocore.session

    return botocore.session.get_session().get_service_model("iam")


def _xml(shape, value) -> str:
    """``value`` serialized as the query protocol serializes ``shape``: a structure's members by name, a list's items
    as ``member``, a map's as ``entry`` with ``key`` and ``value``."""
    if shape.type_name == "structure":
        return "".join(
            f"<{name}>{_xml(shape.members[name], value[name])}</{name}>" for name in shape.members if name in value
        )
    if shape.type_name == "list":
        return "".join(f"<member>{_xml(shape.member, item)}</member>" for item in value)
    if shape.type_name == "map":
        return "".join(
            f"<entry><key>{escape(str(key))}</key><value>{_xml(shape.value, item)}</value></entry>"
            for key, item in value.items()
        )
    if shape.type_name == "boolean":
        return "true" if value else "false"
    return escape(str(value))
