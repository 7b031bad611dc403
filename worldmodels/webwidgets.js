// V's decoder and M's dream in the browser, with onnxruntime-web: one anywidget module
// (render({model, el})) for a running kernel and for the book's static pages, where
// book/_ext/static/wm-web.js gives it a model made from the saved state.
//
// The model answers each request {asset: NAME} with a custom message {asset: NAME} and the
// file's bytes: in a kernel from worldmodels.webwidgets, in the static page from _static/webmodels/.
// Assets: decoder.onnx and dream_step.onnx (worldmodels.webmodels); the model's ``meta`` trait is
// their web_models.json.

const ORT_URL = "https://cdn.jsdelivr.net/npm/onnxruntime-web@1.30.0/dist/ort.wasm.bundle.min.mjs";

// times (ms) of each decode and each dream step in this page, read by the book's browser test
const times = (globalThis.wmWebTimes ??= { decode: [], step: [] });

function asset(model, name) {
  return new Promise((resolve, reject) => {
    const onMessage = (msg, buffers) => {
      if (!msg || msg.asset !== name) return;
      model.off("msg:custom", onMessage);
      if (msg.error) reject(new Error(msg.error));
      else resolve(buffers[0].buffer ? buffers[0].buffer.slice(buffers[0].byteOffset, buffers[0].byteOffset + buffers[0].byteLength) : buffers[0]);
    };
    model.on("msg:custom", onMessage);
    model.send({ asset: name });
  });
}

async function runtime() {
  if (!globalThis.ort) globalThis.ort = await import(ORT_URL);
  const ort = globalThis.ort;
  // several threads need a cross-origin isolated page (SharedArrayBuffer)
  if (!globalThis.crossOriginIsolated) ort.env.wasm.numThreads = 1;
  return ort;
}

async function session(ort, model, name) {
  const bytes = await asset(model, name);
  return ort.InferenceSession.create(new Uint8Array(bytes), { executionProviders: ["wasm"] });
}

function element(tag, attributes = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

function canvas(scale) {
  const c = element("canvas", { width: 64, height: 64, class: "wm-web-frame" });
  c.style.width = c.style.height = `${64 * scale}px`;
  return c;
}

// frames (64, 64, 3) float in [0, 1], channels last, onto a canvas
function draw(target, rgb) {
  const context = target.getContext("2d");
  const image = context.createImageData(64, 64);
  for (let p = 0, q = 0; p < 64 * 64; p++, q += 3) {
    image.data[4 * p] = Math.round(rgb[q] * 255);
    image.data[4 * p + 1] = Math.round(rgb[q + 1] * 255);
    image.data[4 * p + 2] = Math.round(rgb[q + 2] * 255);
    image.data[4 * p + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

async function decode(ort, decoder, z, target) {
  const start = performance.now();
  const out = await decoder.run({ z: new ort.Tensor("float32", z, [1, z.length]) });
  draw(target, out.frame.data);
  times.decode.push(performance.now() - start);
}

// a seeded generator of uniform numbers in [0, 1) (mulberry32), and standard normals from it
function generator(seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const normal = () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
  return { uniform, normal };
}

function latentExplorer(ort, meta, decoder, model, el) {
  const z = Float32Array.from(meta.z_start);
  const frame = canvas(model.get("scale"));
  const sliders = element("div", { class: "wm-web-sliders" });
  let pending = null;
  let busy = null;
  const redraw = () => {
    if (busy) {
      pending = true;
      return;
    }
    busy = decode(ort, decoder, z, frame).finally(() => {
      busy = null;
      if (pending) {
        pending = null;
        redraw();
      }
    });
  };
  const inputs = meta.dims.map((d) => {
    const value = element("span", { class: "wm-web-value", text: z[d].toFixed(2) });
    const input = element("input", {
      type: "range", min: meta.low[d], max: meta.high[d], step: 0.01, value: z[d],
      "aria-label": `z[${d}]`, "data-dim": d,
    });
    input.addEventListener("input", () => {
      z[d] = Number(input.value);
      value.textContent = z[d].toFixed(2);
      redraw();
    });
    sliders.append(element("label", { class: "wm-web-slider" }, [element("span", { text: `z[${d}]` }), input, value]));
    return { d, input, value };
  });
  const reset = element("button", { type: "button", text: "back to the frame's z" });
  reset.addEventListener("click", () => {
    for (const { d, input, value } of inputs) {
      z[d] = meta.z_start[d];
      input.value = z[d];
      value.textContent = z[d].toFixed(2);
    }
    redraw();
  });
  const note = element("p", {
    class: "wm-web-note",
    text: `${meta.dims.length} of V's ${meta.z_size} dimensions carry information (KL above ${meta.kl_threshold} nats over real frames); one slider each. The others stay at the frame's code.`,
  });
  el.append(element("div", { class: "wm-web-row" }, [frame, element("div", {}, [sliders, reset])]), note);
  redraw();
  return busy;
}

const AUTOPILOT = "C drives";

function dreamDriver(ort, meta, decoder, step, model, el) {
  const actions = Object.fromEntries(model.get("actions"));
  const Z = meta.z_size;
  const H = meta.hidden_size;
  const frame = canvas(model.get("scale"));
  const status = element("p", { class: "wm-web-status", text: "step 0" });
  const tauValue = element("span", { class: "wm-web-value" });
  const tau = element("input", { type: "range", min: 0.05, max: 2, step: 0.05, value: model.get("tau"), "aria-label": "temperature" });
  const showTau = () => (tauValue.textContent = `τ = ${Number(tau.value).toFixed(2)}`);
  tau.addEventListener("input", showTau);
  showTau();
  let world;
  const restart = () => {
    world = { z: Float32Array.from(meta.z_start), h: new Float32Array(H), c: new Float32Array(H), t: 0, total: 0, random: generator(model.get("seed")) };
    status.textContent = "step 0";
    return decode(ort, decoder, world.z, frame);
  };
  const advance = async (name) => {
    const start = performance.now();
    const { uniform, normal } = world.random;
    const u = Float32Array.from({ length: Z }, uniform);
    const eps = Float32Array.from({ length: Z }, normal);
    const tensor = (data, shape) => new ort.Tensor("float32", data, shape);
    const feeds = {
      z: tensor(world.z, [1, Z]), action: tensor(Float32Array.from(actions[name] ?? [0, 0, 0]), [1, 3]),
      h: tensor(world.h, [1, H]), c: tensor(world.c, [1, H]), tau: tensor(Float32Array.of(Number(tau.value)), [1]),
      u: tensor(u, [1, Z]), eps: tensor(eps, [1, Z]),
    };
    if (autopilot) feeds.autopilot = tensor(Float32Array.of(name === AUTOPILOT ? 1 : 0), [1]);
    const out = await step.run(feeds);
    world.z = out.z_next.data;
    world.h = out.h_next.data;
    world.c = out.c_next.data;
    world.t += 1;
    const reward = out.reward.data[0];
    world.total += reward;
    await decode(ort, decoder, world.z, frame);
    times.step.push(performance.now() - start);
    const parts = [`step ${world.t}: ${name}`];
    if (autopilot) parts.push(`(steer, gas, brake) = (${[...out.action_taken.data].map((x) => x.toFixed(2)).join(", ")})`);
    if (meta.reward_head) parts.push(`M's predicted reward ${reward.toFixed(2)} (total ${world.total.toFixed(1)})`);
    if (meta.done_head) parts.push(`P(episode ends) ${out.done.data[0].toFixed(2)}`);
    status.textContent = parts.join(" · ");
    el.dataset.wmSteps = world.t;
  };
  let queue = restart();
  const enqueue = (f) => (queue = queue.then(f).catch((e) => (status.textContent = `error: ${e.message}`)));
  // exported with a controller, the dream step can let C drive (worldmodels.webmodels)
  const autopilot = step.inputNames.includes("autopilot");
  const names = autopilot ? [...Object.keys(actions), AUTOPILOT] : Object.keys(actions);
  const buttons = names.map((name) => {
    const b = element("button", { type: "button", text: name, "data-action": name });
    b.addEventListener("click", () => enqueue(() => advance(name)));
    return b;
  });
  const reset = element("button", { type: "button", text: "reset" });
  reset.addEventListener("click", () => enqueue(restart));
  const keys = { ArrowLeft: "left", ArrowRight: "right", ArrowUp: "gas", ArrowDown: "brake", " ": "straight", c: AUTOPILOT };
  el.tabIndex = 0;
  el.addEventListener("keydown", (event) => {
    const name = keys[event.key];
    if (name === undefined || !names.includes(name)) return;
    event.preventDefault();
    enqueue(() => advance(name));
  });
  el.append(
    element("div", { class: "wm-web-buttons" }, [...buttons, reset]),
    element("label", { class: "wm-web-slider" }, [element("span", { text: "temperature" }), tau, tauValue]),
    element("div", { class: "wm-web-row" }, [frame, status]),
    element("p", { class: "wm-web-note", text: `Click here, then drive with the arrow keys (space: straight${autopilot ? "; c: C drives" : ""}), or with the buttons. Each press is one step of M at temperature τ; V draws the dreamed z.` }),
  );
  return queue;
}

async function render({ model, el }) {
  el.classList.add("wm-web");
  const loading = element("p", { class: "wm-web-status", text: "loading the models…" });
  el.append(loading);
  const ort = await runtime();
  const meta = model.get("meta");
  const decoder = await session(ort, model, "decoder.onnx");
  loading.remove();
  if (model.get("kind") === "dream") {
    const step = await session(ort, model, "dream_step.onnx");
    await dreamDriver(ort, meta, decoder, step, model, el);
  } else {
    await latentExplorer(ort, meta, decoder, model, el);
  }
  el.dataset.wmReady = "true";
}

export default { render };
