// The operators' page: sign in, then the dashboard (dashboard.js); a clinician goes to the desktop portal.
import { login, logout, me } from "/ui/api.js";
import { switchLang, t, translate } from "/ui/i18n.js";

async function main() {
  translate();
  document.getElementById("lang").onclick = switchLang;
  const who = await me();
  if (!who) return showSignin();
  if (!who.permissions.includes("read") && !who.permissions.includes("vm.read")) {
    location.href = "/ui/portal.html";
    return;
  }
  document.getElementById("account").hidden = false;
  document.getElementById("recordings").hidden = !who.permissions.includes("audit"); // console recordings
  const out = document.getElementById("signout");
  out.hidden = false;
  out.onclick = async () => {
    await logout();
    location.reload();
  };
  const { showDashboard } = await import("/ui/dashboard.js");
  await showDashboard(document.getElementById("app"), who);
}

// Directory sign-in's state (ok, unreachable, off): a public answer that says nothing of any user.
async function directoryNotice() {
  try {
    const r = await fetch("/v1/directory/status", { credentials: "same-origin" });
    const s = r.ok ? await r.json() : null;
    document.getElementById("signin-directory").hidden = !(s && s.directory === "unreachable");
  } catch (e) {
    // the notice is a help, not a condition of signing in
  }
}

function showSignin() {
  const form = document.getElementById("signin");
  form.hidden = false;
  directoryNotice();
  const code = form.totp;
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      await login(form.user.value, form.password.value, code.hidden ? undefined : code.value.trim());
      location.reload();
    } catch (e) {
      const why = e.details && e.details.totp;
      if (why === "required") {
        // The server asks for the second factor: show the code field (a missing code counts as a failed try).
        code.hidden = false;
        form.querySelector('label[for="totp"]').hidden = false;
        code.required = true;
        code.value = "";
        code.focus();
      }
      const text = why === "required" ? t("signin.totp_needed") : why === "enroll" ? t("signin.totp_enroll") : "";
      document.getElementById("signin-error").textContent = `${t("signin.failed")}: ${text || e.message}`;
      if (e.status === 503) directoryNotice();
    }
  };
}

main();
