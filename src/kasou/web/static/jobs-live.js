// Live progress of jobs started from the dashboard: server-sent events (/v1/jobs/{id}/events), polling as a fallback.
import { followJob } from "/ui/api.js";
import { t } from "/ui/i18n.js";

function stateWord(s) {
  return t(`state.${s}`);
}

// Show a job in the live panel (el) and follow it; onEnd(job) once it has ended.
export function trackJob(el, job, title, onEnd) {
  const row = document.createElement("div");
  row.className = "job";
  row.dataset.job = job.id;
  row.innerHTML = `<span class="title"></span> <span class="state"></span>
    <span class="progress" role="progressbar" aria-valuemin="0" aria-valuemax="100"><div></div></span>
    <span class="pct"></span> <span class="step muted"></span>
    <button type="button" class="action close" hidden></button>`;
  row.querySelector(".title").textContent = title;
  const close = row.querySelector(".close");
  close.textContent = t("act.close");
  close.onclick = () => row.remove();
  el.prepend(row);
  el.hidden = false;

  let ended = false;
  const show = (j) => {
    const pct = Math.round((j.progress || 0) * 100);
    const st = row.querySelector(".state");
    st.className = `state ${j.state === "running" ? "running-job" : j.state}`;
    st.textContent = stateWord(j.state);
    const bar = row.querySelector(".progress");
    bar.setAttribute("aria-valuenow", String(pct));
    bar.setAttribute("aria-label", `${title} ${pct}%`);
    bar.firstElementChild.style.width = `${pct}%`;
    row.querySelector(".pct").textContent = `${pct}%`;
    let step = j.step || "";
    if (j.state === "failed") step = t("job.failed", { error: (j.error && j.error.message) || "" });
    else if (j.state === "succeeded") step = t("job.done");
    row.querySelector(".step").textContent = step;
    row.dataset.state = j.state;
  };
  const finish = (j) => {
    if (ended) return;
    ended = true;
    show(j);
    close.hidden = false;
    if (onEnd) onEnd(j);
  };
  show(job);

  const poll = () => followJob(job, show).then(finish, (e) => {
    row.querySelector(".step").textContent = e.message;
    close.hidden = false;
  });
  if (!window.EventSource) return poll();
  const es = new EventSource(`/v1/jobs/${encodeURIComponent(job.id)}/events`);
  let last = job;
  es.addEventListener("job", (ev) => {
    last = JSON.parse(ev.data);
    show(last);
  });
  es.addEventListener("end", () => {
    es.close();
    finish(last);
  });
  es.addEventListener("timeout", () => {
    es.close();
    poll();
  });
  es.onerror = () => {
    if (ended) return;
    es.close();
    poll(); // the stream broke (a proxy, a restart): follow the job by polling
  };
}
