// SPDX-License-Identifier: AGPL-3.0-or-later
//
// The local AWS's IAM evaluator: @cloud-copilot/iam-simulate (AGPL-3.0-or-later) as a program of its own, spoken to
// over its standard input and output, one JSON object a line. It holds no state: each request carries the policies
// that apply (identity, session, resource) and the request's principal, action, resource and context keys, and gets
// back the decision with the statements that made it. Requests are answered as they finish, each with its id.
//
//   in:  {"id": 1, "simulation": {request, identityPolicies, sessionPolicy?, resourcePolicy?, ...}}
//   out: {"id": 1, "result": "Allowed" | "ExplicitlyDenied" | "ImplicitlyDenied", "grants": [...], "denials": [...],
//         "ignoredContextKeys": [...], "missingContextKeys": [...], "boundary": "Allowed" | ... | null}
//        or {"id": 1, "error": "what the simulator refused"}
//
// missingContextKeys: the context keys that conditions of the statements applying to the request (their action,
// resource and principal match) read, and the request does not carry; boundary: the permissions boundary's own
// decision, null where the simulation has none.
//
// This file is a separate program from the rest of the project, which only starts it and exchanges JSON with it.

import { createInterface } from 'node:readline'
import { getDenialReasons, getGrantReasons, runSimulation } from '@cloud-copilot/iam-simulate'

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })

function answer(message) {
  process.stdout.write(JSON.stringify(message) + '\n')
}

function missingContextKeys(analysis) {
  const missing = new Set()
  const parts = [analysis.identityAnalysis, analysis.resourceAnalysis, analysis.permissionBoundaryAnalysis, analysis.sessionAnalysis]
  for (const part of parts) {
    const statements = [...(part?.allowStatements ?? []), ...(part?.denyStatements ?? []), ...(part?.unmatchedStatements ?? [])]
    for (const { explain } of statements) {
      if (!explain.actionMatch || !explain.resourceMatch || explain.principalMatch === 'NoMatch') continue
      for (const condition of explain.conditions ?? []) {
        if (condition.failedBecauseMissing || condition.matchedBecauseMissing) missing.add(condition.conditionKeyValue)
      }
    }
  }
  return [...missing].sort()
}

async function evaluate(id, simulation) {
  const outcome = await runSimulation(
    { serviceControlPolicies: [], resourceControlPolicies: [], ...simulation },
    { simulationMode: 'Strict' }
  )
  if (outcome.resultType === 'error') {
    return { id, error: JSON.stringify(outcome.errors) }
  }
  // A request on `*` for an action whose resource types are all optional is evaluated once per type: the decision
  // is the overall one, explained by a result that reached it.
  const single =
    outcome.resultType === 'single'
      ? outcome.result
      : outcome.results.find((result) => result.analysis.result === outcome.overallResult)
  if (!single && outcome.overallResult === 'ImplicitlyDenied') {
    // No statement of any policy applies to any of the action's resource types.
    return {
      id,
      result: outcome.overallResult,
      grants: [],
      denials: [{ policyType: 'identity', denialType: 'Implicit' }],
      ignoredContextKeys: [],
      missingContextKeys: [],
      boundary: null
    }
  }
  if (!single) {
    return { id, error: `no ${outcome.resultType} result reached the overall decision ${outcome.overallResult}` }
  }
  const analysis = single.analysis
  return {
    id,
    result: analysis.result,
    grants: analysis.result === 'Allowed' ? getGrantReasons(analysis) : [],
    denials: analysis.result === 'Allowed' ? [] : getDenialReasons(analysis),
    ignoredContextKeys: single.ignoredContextKeys ?? [],
    missingContextKeys: missingContextKeys(analysis),
    boundary: analysis.permissionBoundaryAnalysis?.result ?? null
  }
}

lines.on('line', (line) => {
  let message
  try {
    message = JSON.parse(line)
  } catch (error) {
    answer({ id: null, error: `not JSON: ${error.message}` })
    return
  }
  evaluate(message.id, message.simulation).then(answer, (error) =>
    answer({ id: message.id, error: `${error?.name ?? 'Error'}: ${error?.message ?? error}` })
  )
})
