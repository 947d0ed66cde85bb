// MedCap's stack viewer: every slice of a series, rendered by the server from the stored DICOM under
// the window asked for (GET .../slices/N.png?c=CENTER&w=WIDTH). No library, no inline script: the
// page's content security policy (default-src 'self') stays as it is.
//
// Scroll: wheel, arrow keys, PgUp/PgDn, Home/End, the slider. Window: drag (left-right width,
// up-down level), presets (buttons or 1-7). Zoom: Ctrl+wheel, +/-. Pan: Shift+drag or middle button.
// 0 resets the view, k jumps to the next key image. State is mirrored into data-* attributes
// (index, center, width, zoom, shown) for tests and for anyone inspecting the page.
"use strict";

(function () {
  const stacks = [];
  let active = null;

  function typing(target) {
    return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  class Stack {
    constructor(root) {
      this.root = root;
      this.canvas = root.querySelector("canvas");
      this.info = root.querySelector(".stack-info");
      this.slider = root.querySelector(".stack-slider");
      this.presetBar = root.querySelector(".stack-presets");
      this.windowText = root.querySelector(".stack-window");
      this.keyBar = root.querySelector(".stack-keys");
      this.images = new Map(); // url -> loaded Image, the most recent few
      this.loading = null;
      this.shown = null;
      this.index = 0;
      this.zoom = 1;
      this.panX = 0;
      this.panY = 0;
    }

    async load() {
      const response = await fetch(this.root.dataset.stack, { credentials: "same-origin" });
      if (!response.ok) {
        let detail = `the stack could not be loaded (${response.status})`;
        try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
        this.info.textContent = detail;
        return;
      }
      this.meta = await response.json();
      const [center, width] = this.meta.windows.default;
      this.center = center;
      this.width = width;
      this.preset = "default";
      this.slider.max = String(this.meta.count - 1);
      this.buildPresets();
      this.buildKeys();
      this.bind();
      const first = this.meta.keys.length ? this.meta.keys[0].index : Math.floor(this.meta.count / 2);
      this.root.dataset.count = String(this.meta.count);
      this.go(first);
    }

    buildPresets() {
      Object.keys(this.meta.windows).forEach((name, i) => {
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.preset = name;
        button.textContent = `${name.replace("_", " ")} ${i + 1}`;
        button.title = `Window: ${name} (key ${i + 1})`;
        button.addEventListener("click", () => { this.usePreset(name); this.root.focus(); });
        this.presetBar.appendChild(button);
      });
    }

    buildKeys() {
      for (const key of this.meta.keys) {
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.index = String(key.index);
        button.textContent = `${key.label}: slice ${key.index + 1}`;
        button.addEventListener("click", () => { this.go(key.index); this.root.focus(); });
        this.keyBar.appendChild(button);
      }
      // The key image thumbnails beside the text are one click away from their slice too.
      const section = this.root.closest(".series");
      for (const thumb of section ? section.querySelectorAll(".key-thumb") : []) {
        const index = this.meta.slices.findIndex((s) => s.sop_instance_uid === thumb.dataset.sop);
        if (index >= 0) thumb.addEventListener("click", () => { this.go(index); this.root.focus(); });
      }
    }

    bind() {
      const viewport = this.canvas;
      this.root.addEventListener("focus", () => setActive(this));
      this.root.addEventListener("pointerdown", () => setActive(this));
      this.slider.addEventListener("input", () => this.go(Number(this.slider.value)));
      viewport.addEventListener("wheel", (event) => {
        event.preventDefault();
        setActive(this);
        if (event.ctrlKey) this.zoomBy(event.deltaY < 0 ? 1.15 : 1 / 1.15);
        else this.go(this.index + Math.sign(event.deltaY || event.deltaX));
      }, { passive: false });
      viewport.addEventListener("contextmenu", (event) => event.preventDefault());
      viewport.addEventListener("pointerdown", (event) => {
        event.preventDefault();
        this.root.focus();
        const mode = event.shiftKey || event.button === 1 ? "pan" : "window";
        const start = { x: event.clientX, y: event.clientY, center: this.center, width: this.width, panX: this.panX, panY: this.panY };
        viewport.setPointerCapture(event.pointerId);
        const move = (e) => {
          const dx = e.clientX - start.x;
          const dy = e.clientY - start.y;
          if (mode === "pan") {
            this.panX = start.panX + dx;
            this.panY = start.panY + dy;
            this.draw();
          } else {
            // One screen width of drag doubles (or empties) the window: fine steps in a narrow
            // brain window, big ones in a lung window.
            const scale = Math.max(start.width, 10) / 256;
            this.setWindow(start.center - dy * scale, Math.max(1, start.width + dx * scale), null);
          }
        };
        const up = () => {
          viewport.removeEventListener("pointermove", move);
          viewport.removeEventListener("pointerup", up);
          viewport.removeEventListener("pointercancel", up);
        };
        viewport.addEventListener("pointermove", move);
        viewport.addEventListener("pointerup", up);
        viewport.addEventListener("pointercancel", up);
      });
    }

    key(event) {
      const step = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1, PageUp: -10, PageDown: 10 }[event.key];
      if (step !== undefined) this.go(this.index + step);
      else if (event.key === "Home") this.go(0);
      else if (event.key === "End") this.go(this.meta.count - 1);
      else if (event.key === "+" || event.key === "=") this.zoomBy(1.25);
      else if (event.key === "-") this.zoomBy(0.8);
      else if (event.key === "0") { this.zoom = 1; this.panX = 0; this.panY = 0; this.usePreset("default"); }
      else if (event.key === "k") this.nextKey();
      else if (/^[1-9]$/.test(event.key) && Object.keys(this.meta.windows)[Number(event.key) - 1]) {
        this.usePreset(Object.keys(this.meta.windows)[Number(event.key) - 1]);
      } else return false;
      return true;
    }

    nextKey() {
      if (!this.meta.keys.length) return;
      const after = this.meta.keys.find((k) => k.index > this.index);
      this.go((after || this.meta.keys[0]).index);
    }

    usePreset(name) {
      const [center, width] = this.meta.windows[name];
      this.setWindow(center, width, name);
    }

    setWindow(center, width, preset) {
      this.center = center;
      this.width = width;
      this.preset = preset;
      this.request();
    }

    zoomBy(factor) {
      this.zoom = Math.min(8, Math.max(0.5, this.zoom * factor));
      this.draw();
    }

    go(index) {
      if (!this.meta) return;
      this.index = Math.min(this.meta.count - 1, Math.max(0, index));
      this.request();
    }

    url(index) {
      return `${this.meta.image}${index}.png?c=${this.center.toFixed(1)}&w=${this.width.toFixed(1)}`;
    }

    fetchImage(url) {
      if (this.images.has(url)) return Promise.resolve(this.images.get(url));
      return new Promise((resolve, reject) => {
        const image = new Image();
        image.onload = () => {
          this.images.set(url, image);
          if (this.images.size > 96) this.images.delete(this.images.keys().next().value);
          resolve(image);
        };
        image.onerror = () => reject(new Error(`slice ${url} could not be loaded`));
        image.src = url;
      });
    }

    // The latest request wins: while one slice loads, further wheel steps or drags only update
    // what is wanted, and the newest wish is fetched when the load ends.
    request() {
      this.updateText();
      const url = this.url(this.index);
      this.wanted = url;
      if (this.loading) return;
      this.loading = url;
      this.fetchImage(url)
        .then((image) => { this.image = image; this.shown = url; this.draw(); })
        .catch((error) => { this.info.textContent = error.message; })
        .finally(() => {
          this.loading = null;
          if (this.wanted !== this.shown && this.wanted !== url) this.request();
          else this.prefetch();
        });
    }

    prefetch() {
      for (const i of [this.index + 1, this.index - 1, this.index + 2]) {
        if (i >= 0 && i < this.meta.count) this.fetchImage(this.url(i)).catch(() => {});
      }
    }

    draw() {
      const ctx = this.canvas.getContext("2d");
      const { width: cw, height: ch } = this.canvas;
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, cw, ch);
      if (this.image) {
        const fit = Math.min(cw / this.image.naturalWidth, ch / this.image.naturalHeight) * this.zoom;
        const w = this.image.naturalWidth * fit;
        const h = this.image.naturalHeight * fit;
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(this.image, (cw - w) / 2 + this.panX, (ch - h) / 2 + this.panY, w, h);
      }
      Object.assign(this.root.dataset, {
        index: String(this.index),
        center: this.center.toFixed(1),
        width: this.width.toFixed(1),
        zoom: this.zoom.toFixed(2),
        shown: this.shown || "",
      });
      this.updateText();
    }

    updateText() {
      const slice = this.meta.slices[this.index];
      const key = this.meta.keys.find((k) => k.index === this.index);
      const number = slice.number !== null ? ` · image ${slice.number}` : "";
      this.info.textContent = `Slice ${this.index + 1} / ${this.meta.count} · ${slice.position.toFixed(1)} mm${number}${key ? ` · ${key.label}` : ""}`;
      this.slider.value = String(this.index);
      this.windowText.textContent = `W ${Math.round(this.width)} / L ${Math.round(this.center)}${this.zoom !== 1 ? ` · zoom ${this.zoom.toFixed(2)}×` : ""}`;
      for (const b of this.presetBar.children) b.classList.toggle("current", b.dataset.preset === this.preset);
      for (const b of this.keyBar.children) b.classList.toggle("here", Number(b.dataset.index) === this.index);
    }
  }

  function setActive(stack) {
    if (active === stack) return;
    if (active) active.root.classList.remove("active");
    active = stack;
    stack.root.classList.add("active");
  }

  document.addEventListener("keydown", (event) => {
    if (!active || !active.meta || typing(event.target) || event.altKey || event.ctrlKey || event.metaKey) return;
    if (active.key(event)) event.preventDefault();
  });

  window.MedCapStacks = { all: stacks, active: () => active };
  for (const root of document.querySelectorAll(".stack[data-stack]")) {
    const stack = new Stack(root);
    stacks.push(stack);
    stack.load();
  }
  if (stacks.length) setActive(stacks[0]);
})();
