// The operators' page: sign in, then the dashboard (dashboard.js); a clinician goes to the desktop portal.
import { login, logout, me } from "/ui/api.js";
import { switchLang, t, translate } from "/ui/i18n.js";

async function main() {
  translate();
  document.getElementById("lang").onclick = switchLang;
  const who = await me();
  if (!who) return showSignin();
  if (!who.permissions.includes("read")) {
    location.href = "/ui/portal.html";
    return;
  }
  const out = document.getElementById("signout");
  out.hidden = false;
  out.onclick = async () => {
    await logout();
    location.reload();
  };
  const { showDashboard } = await import("/ui/dashboard.js");
  await showDashboard(document.getElementById("app"), who);
}

function showSignin() {
  const form = document.getElementById("signin");
  form.hidden = false;
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      await login(form.user.value, form.password.value);
      location.reload();
    } catch (e) {
      document.getElementById("signin-error").textContent = `${t("signin.failed")}: ${e.message}`;
    }
  };
}

main();
