// Loaded before the theme's scripts (see book/_ext/wm_widgets.py).

// The theme's Font Awesome replaces each <i class="fa ..."> by an <svg>, and by default also
// those added later, such as the icons of the widgets' buttons, which ipywidgets' views look
// up as <i> to update them (the Play view throws on every change without it). Converting the
// theme's icons once, when the page is ready, leaves the widgets' <i>s to the widget manager's
// own Font Awesome font.
window.FontAwesomeConfig = Object.assign({}, window.FontAwesomeConfig, { observeMutations: false });

// The widget manager's AMD modules find their fonts next to the module's URL, which RequireJS
// takes from the module's name (relative to the page) unless a path maps it.
{
  const vendor = new URL("vendor/html-manager/", document.currentScript.src).href;
  window.require = { paths: { "@jupyter-widgets/html-manager/dist": vendor.slice(0, -1) } };
  for (const name of ["base", "base7", "controls", "controls7", "html-manager"]) {
    window.require.paths[`@jupyter-widgets/${name}`] = vendor + name;
  }
}

// The widget manager typesets its labels with MathJax 2's MathJax.Hub.Queue; the book loads
// MathJax 3. DOMContentLoaded comes after the deferred MathJax script has run and before the
// manager renders the widgets (on window load).
document.addEventListener("DOMContentLoaded", () => {
  const mathjax = window.MathJax;
  if (mathjax === undefined || mathjax.Hub !== undefined) return;
  mathjax.Hub = {
    Queue(command) {
      const element = command[command.length - 1];
      if (mathjax.startup && mathjax.typesetPromise) {
        mathjax.startup.promise.then(() => mathjax.typesetPromise([element]));
      }
    },
  };
});
