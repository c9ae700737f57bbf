export default {
  render({ model, el }) {
    const width = model.get("width"), height = model.get("height");
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.className = "microcnn-canvas";
    canvas.style.cssText = `width:${width}px;height:${height}px;cursor:crosshair;touch-action:none;` +
      "border:1px solid #888;display:block";
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, width, height); };
    clear();
    let drawing = false, last = null, timer = null;
    // Bright strokes on black, as in MNIST; one grey byte per pixel goes to Python.
    const send = () => {
      timer = null;
      const rgba = ctx.getImageData(0, 0, width, height).data;
      const grey = new Uint8Array(width * height);
      for (let i = 0; i < grey.length; i++) grey[i] = rgba[4 * i];
      model.set("pixels", new DataView(grey.buffer));
      model.save_changes();
    };
    const at = (e) => {
      const r = canvas.getBoundingClientRect();
      return [(e.clientX - r.left) * width / r.width, (e.clientY - r.top) * height / r.height];
    };
    const line = (a, b) => {
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = model.get("stroke_width");
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(a[0], a[1]);
      ctx.lineTo(b[0], b[1]);
      ctx.stroke();
    };
    canvas.addEventListener("pointerdown", (e) => {
      drawing = true;
      last = at(e);
      line(last, last);
      canvas.setPointerCapture(e.pointerId);
      e.preventDefault();
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!drawing) return;
      const p = at(e);
      line(last, p);
      last = p;
      if (timer === null) timer = setTimeout(send, 150);  // live, but not on every mouse event
    });
    const finish = () => {
      if (!drawing) return;
      drawing = false;
      if (timer !== null) clearTimeout(timer);
      send();
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
    const button = document.createElement("button");
    button.textContent = "Clear";
    button.className = "microcnn-clear";
    button.onclick = () => { clear(); send(); };
    el.append(canvas, button);
  }
};
