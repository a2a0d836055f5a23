#!/usr/bin/env node
// js-libp2p interop client for the MTOR py-libp2p node.
//
// usage: node client.mjs --addr <multiaddr with /p2p/ID> --key <dht key> [--timeout-ms 20000]
//
// Starts a js-libp2p node (TCP, Noise, Yamux, identify, ping, kad-dht in client mode),
// dials --addr, waits for identify, pings, fetches --key from the DHT and prints exactly
// one JSON line on stdout:
//   {"ok":true,"remote_peer":...,"identify":{...},"ping_ms":...,"value_b64":...}   exit 0
//   {"ok":false,"stage":"dial|identify|ping|dht","error":...}                       exit 1
// (bad arguments and node start-up failures are reported as stage "dial", with the error
// prefixed "bad arguments:" / "node start failed:")
// Everything else (debug logs via DEBUG=libp2p:*) goes to stderr. The process always
// exits on its own: a hard timer fires after --timeout-ms (+ a short grace for stop()).

import './node20-shim.mjs' // must stay the first import (Promise.withResolvers on Node 20)
import { parseArgs } from 'node:util'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

let stage = 'dial'
let done = false
let node = null
let opts
let deadline = null

function emit (obj) {
  if (done) return
  done = true
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function errString (err) {
  if (err == null) return 'unknown error'
  const name = err.name != null && err.name !== 'Error' ? `${err.name}: ` : ''
  let msg = `${name}${err.message ?? String(err)}`
  if (Array.isArray(err.errors) && err.errors.length > 0) {
    msg += ' [' + err.errors.map(e => errString(e)).join('; ') + ']'
  }
  return msg
}

async function finish (code) {
  // stop() must not hang the process; give it a bounded amount of time
  if (node != null) {
    const n = node
    node = null
    await Promise.race([
      n.stop().catch(() => {}),
      new Promise(resolve => setTimeout(resolve, 2000).unref())
    ])
  }
  process.exit(code)
}

function fail (err) {
  if (done) return // result already printed; late background errors must not change it
  let error = errString(err)
  if (deadline?.aborted === true) error = `timed out after ${opts.timeoutMs}ms: ${error}`
  emit({ ok: false, stage, error })
  return finish(1)
}

try {
  const { values } = parseArgs({
    options: {
      addr: { type: 'string' },
      key: { type: 'string' },
      'timeout-ms': { type: 'string', default: '20000' }
    },
    strict: true
  })
  opts = values
  if (opts.addr == null || opts.key == null) {
    throw new Error('usage: node client.mjs --addr <multiaddr with /p2p/ID> --key <dht key> [--timeout-ms 20000]')
  }
  opts.timeoutMs = Number.parseInt(opts['timeout-ms'], 10)
  if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) {
    throw new Error(`bad --timeout-ms: ${opts['timeout-ms']}`)
  }
} catch (err) {
  emit({ ok: false, stage, error: `bad arguments: ${errString(err)}` })
  process.exit(1)
}

// Hard deadline: the overall AbortSignal fires at timeoutMs; if something ignores it,
// this timer reports the current stage and exits anyway.
deadline = AbortSignal.timeout(opts.timeoutMs)
const hardTimer = setTimeout(() => {
  emit({ ok: false, stage, error: `timed out after ${opts.timeoutMs}ms` })
  finish(1)
}, opts.timeoutMs + 1000)
// (hardTimer stays ref'd so the event loop can never drain before a result is printed)
setTimeout(() => process.exit(1), opts.timeoutMs + 5000).unref()
process.on('exit', () => {
  if (!done) {
    emit({ ok: false, stage, error: 'exited without a result' })
    process.exitCode = 1
  }
})

process.on('unhandledRejection', err => { fail(err) })
process.on('uncaughtException', err => { fail(err) })

// "mtor" records are opaque to js: accept anything, pick the first. Our python side validates.
const mtorValidator = async (_key, _value) => {}
const mtorSelector = (_key, _records) => 0

/** Resolve with the first 'peer:identify' result for peer id string `peerIdStr`, reject on abort. */
function waitForIdentify (libp2p, peerIdStr, signal) {
  return new Promise((resolve, reject) => {
    const onIdentify = (evt) => {
      if (evt.detail.peerId.toString() === peerIdStr) {
        cleanup()
        resolve(evt.detail)
      }
    }
    const onAbort = () => {
      cleanup()
      reject(signal.reason ?? new Error('aborted'))
    }
    const cleanup = () => {
      libp2p.removeEventListener('peer:identify', onIdentify)
      signal.removeEventListener('abort', onAbort)
    }
    if (signal.aborted) { onAbort(); return }
    libp2p.addEventListener('peer:identify', onIdentify)
    signal.addEventListener('abort', onAbort)
  })
}

async function main () {
  stage = 'dial'
  let target
  try {
    target = multiaddr(opts.addr)
  } catch (err) {
    throw new Error(`bad arguments: --addr ${opts.addr}: ${errString(err)}`)
  }
  const remotePeerStr = target.getComponents().findLast(c => c.name === 'p2p')?.value
  if (remotePeerStr == null) {
    throw new Error(`bad arguments: --addr must contain /p2p/<peer id>: ${opts.addr}`)
  }

  try {
    node = await createLibp2p({
      addresses: { listen: [] }, // dial-only client
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      services: {
        identify: identify(),
        // kad-dht pings every new contact (via this service) before adding it to its
        // routing table; with the default limit of 1 outbound ping stream per connection
        // our own ping races it, kad-dht's fails with TooManyOutboundProtocolStreamsError,
        // the py peer never enters the routing table and the DHT query hangs.
        ping: ping({ maxOutboundStreams: 4 }),
        dht: kadDHT({
          protocol: '/ipfs/kad/1.0.0',
          clientMode: true,
          // default mapper drops private/loopback addrs -> the py peer would never
          // enter the routing table and queries would wait forever
          peerInfoMapper: passthroughMapper,
          validators: { mtor: mtorValidator },
          selectors: { mtor: mtorSelector }
        })
      }
    })
  } catch (err) {
    throw new Error(`node start failed: ${errString(err)}`)
  }

  // register before dialing: identify runs automatically on connection open
  const identified = waitForIdentify(node, remotePeerStr, deadline)
  identified.catch(() => {}) // handled below

  stage = 'dial'
  const conn = await node.dial(target, { signal: deadline })
  const remotePeer = conn.remotePeer

  stage = 'identify'
  // identify runs automatically on connection open (kad-dht needs it to learn that the
  // peer speaks /ipfs/kad/1.0.0). If no result shows up in time, run it explicitly: that
  // either succeeds or surfaces the real error.
  const idWaitMs = Math.max(1000, Math.floor(opts.timeoutMs / 4))
  let idWaitTimer
  let idResult = await Promise.race([
    identified,
    new Promise(resolve => { idWaitTimer = setTimeout(resolve, idWaitMs, null) })
  ])
  clearTimeout(idWaitTimer)
  if (idResult == null) {
    idResult = await node.services.identify.identify(conn, { signal: deadline })
  }

  stage = 'ping'
  const pingMs = await node.services.ping.ping(remotePeer, { signal: deadline })

  stage = 'dht'
  const key = new TextEncoder().encode(opts.key)
  let value = null
  const queryErrors = []
  for await (const evt of node.services.dht.get(key, { signal: deadline })) {
    if (evt.name === 'VALUE') {
      value = evt.value
      break
    }
    if (evt.name === 'QUERY_ERROR') {
      queryErrors.push(`${evt.from?.toString()}: ${errString(evt.error)}`)
    }
  }
  if (value == null) {
    throw new Error(`no value for ${opts.key}` + (queryErrors.length > 0 ? ` (${queryErrors.join('; ')})` : ''))
  }

  emit({
    ok: true,
    remote_peer: remotePeer.toString(),
    identify: {
      agentVersion: idResult.agentVersion ?? null,
      protocolVersion: idResult.protocolVersion ?? null,
      protocols: [...idResult.protocols].sort(),
      listenAddrs: idResult.listenAddrs.map(a => a.toString())
    },
    ping_ms: pingMs,
    value_b64: Buffer.from(value).toString('base64')
  })
  await finish(0)
}

main().catch(fail)
