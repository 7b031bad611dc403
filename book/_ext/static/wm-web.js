// The widgets whose models run in the browser (worldmodels/webwidgets.js), in the static page:
// each place that book/_ext/wm_widgets.py wrote (.wm-web-widget, with the widget's saved state)
// gets a model made from that state, whose asset requests are answered from _static/webmodels/,
// and onnxruntime-web from _static/vendor/. The static picture stays until the widget runs.
{
  const root = new URL("./", document.currentScript.src);

  function savedModel(state) {
    const listeners = new Map();
    const emit = (event, ...args) => (listeners.get(event) ?? []).forEach((f) => f(...args));
    return {
      get: (key) => state[key],
      set(key, value) {
        state[key] = value;
        emit(`change:${key}`);
      },
      save_changes() {},
      on(event, f) {
        listeners.set(event, [...(listeners.get(event) ?? []), f]);
      },
      off(event, f) {
        listeners.set(event, (listeners.get(event) ?? []).filter((g) => g !== f));
      },
      send(message) {
        if (!message || !message.asset) return;
        fetch(new URL(`webmodels/${message.asset}`, root))
          .then((r) => (r.ok ? r.arrayBuffer() : Promise.reject(new Error(`${message.asset}: HTTP ${r.status}`))))
          .then((bytes) => emit("msg:custom", { asset: message.asset }, [bytes]))
          .catch((e) => emit("msg:custom", { asset: message.asset, error: e.message }, []));
      },
    };
  }

  async function start(place) {
    const state = JSON.parse(place.querySelector("script.wm-web-state").textContent);
    const view = place.querySelector(".wm-web-view");
    globalThis.ort ??= await import(new URL("vendor/onnxruntime-web/ort.wasm.bundle.min.mjs", root).href);
    globalThis.ort.env.wasm.wasmPaths = new URL("vendor/onnxruntime-web/", root).href;
    const widget = await import(new URL("wm-webwidgets.js", root).href);
    await widget.default.render({ model: savedModel(state), el: view });
    place.classList.add("wm-web-running");
  }

  function note(place, text) {
    place.querySelector(".wm-web-fallback-note").textContent = text;
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const place of document.querySelectorAll(".wm-web-widget")) {
      if (location.protocol === "file:") {
        // a page opened as a file may not load modules or fetch files (Chromium, Firefox)
        note(place, "Its models run in your browser when the book is served over HTTP, for instance with `python -m http.server` in _build/html; opened as a file, the browser does not let the page load them.");
        continue;
      }
      start(place).catch((e) => note(place, `The models could not start in this browser (${e.message}).`));
    }
  });
}
