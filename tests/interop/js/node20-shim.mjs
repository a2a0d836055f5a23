// Node 20 compatibility shim. Must be imported before any libp2p module.
//
// Promise.withResolvers (ES2024) only exists from Node 22. js-libp2p 2.x itself does not
// need it, but its transitive lock library (mortice >=3.3 -> it-queue, used by
// @libp2p/peer-store for every peer-store write) calls it; without this the node crashes
// on start/stop under Node 20 with "Promise.withResolvers is not a function".
// Spec-equivalent polyfill; a no-op on Node >= 22.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    value: function withResolvers () {
      let resolve
      let reject
      const promise = new this((res, rej) => {
        resolve = res
        reject = rej
      })
      return { promise, resolve, reject }
    }
  })
}
