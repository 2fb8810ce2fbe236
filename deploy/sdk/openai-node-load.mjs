// 100 concurrent requests through the gateway with the official OpenAI
// Node SDK and its default retries (2, honouring retry-after-ms and
// Retry-After), as a new user would send them. Prints one JSON line: how
// many succeeded, how many HTTP attempts the SDK made and what they were
// answered, and the latencies.
//
//   BASE_URL=http://127.0.0.1:8000/v1 MODEL=alpha N=100 node openai-node-load.mjs
//
// Run by TestE2EOpenAINodeSDK (make e2e), which installs the SDK with npm.
import OpenAI from "openai";

const n = Number(process.env.N ?? 100);
const stream = process.env.STREAM === "1";
const statuses = {};
let attempts = 0;
// Count every HTTP attempt the SDK makes, retries included.
const counting = async (url, init) => {
  attempts++;
  const res = await fetch(url, init);
  statuses[res.status] = (statuses[res.status] ?? 0) + 1;
  return res;
};
const client = new OpenAI({
  baseURL: process.env.BASE_URL,
  apiKey: process.env.OPENAI_API_KEY ?? "none",
  fetch: counting,
});

async function one(i) {
  const t0 = performance.now();
  try {
    if (stream) {
      const s = await client.chat.completions.create({
        model: process.env.MODEL, messages: [{ role: "user", content: `hello ${i}` }], max_tokens: 4, stream: true,
      });
      let chunks = 0;
      for await (const c of s) {
        if (c.usage) throw new Error("a usage chunk the client did not ask for");
        chunks++;
      }
      if (chunks === 0) throw new Error("empty stream");
    } else {
      const r = await client.chat.completions.create({
        model: process.env.MODEL, messages: [{ role: "user", content: `hello ${i}` }], max_tokens: 4,
      });
      if (!r._request_id) throw new Error("no request id");
    }
    return { ok: true, ms: performance.now() - t0 };
  } catch (e) {
    return { ok: false, ms: performance.now() - t0, err: `${e.constructor.name}: ${e.status ?? ""} ${e.message}`.slice(0, 200) };
  }
}

const t0 = performance.now();
const results = await Promise.all(Array.from({ length: n }, (_, i) => one(i)));
const ms = results.map((r) => r.ms).sort((a, b) => a - b);
const q = (p) => Math.round(ms[Math.min(ms.length - 1, Math.floor(p * ms.length))]);
const errors = {};
for (const r of results) if (!r.ok) errors[r.err] = (errors[r.err] ?? 0) + 1;
console.log(JSON.stringify({
  sdk: (await import("openai/version")).VERSION,
  node: process.version,
  requests: n,
  succeeded: results.filter((r) => r.ok).length,
  attempts,
  statuses,
  p50_ms: q(0.5),
  p90_ms: q(0.9),
  max_ms: Math.round(ms[ms.length - 1]),
  wall_ms: Math.round(performance.now() - t0),
  errors,
}));
